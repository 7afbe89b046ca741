"""FR-Spec vocabulary (Zhao et al. 2025, arXiv:2502.14856): the draft's output head keeps
only the N most frequent tokens of a corpus, cutting its LM-head cost; verification still uses the
full vocabulary, so outputs are unchanged (``cpmjax.serve.speculative`` handles q = 0 off the set).

CPM.cu ships N = 32768 of 73448, counted on wikitext-103 with EOS force-included
(``scripts/fr_spec/gen_fr_index.py``); here the corpus is tokenized with the project tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.atomic import atomic_file, write_json
from cpmjax.config import ModelConfig
from cpmjax.model.params import Params
from cpmjax.model.transformer import output_weight


def token_counts(token_docs: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Occurrences of every id ``[vocab_size]`` int64; an id outside the vocabulary is an error."""
    counts = np.zeros(vocab_size, np.int64)
    for doc in token_docs:
        ids = np.asarray(doc, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token id out of [0, {vocab_size}): [{ids.min()}, {ids.max()}]")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def top_tokens(counts: np.ndarray, n: int, force: Sequence[int] = ()) -> np.ndarray:
    """The ``n`` most frequent ids (ties by smaller id), with ``force`` ids (EOS) always included;
    returned sorted by decreasing frequency, as int32."""
    V = counts.shape[0]
    if not 0 < n <= V:
        raise ValueError(f"FR-Spec size must be in [1, {V}], got {n}")
    force = list(dict.fromkeys(int(f) for f in force))
    if len(force) > n or any(not 0 <= f < V for f in force):
        raise ValueError(f"forced ids {force} must be < {V} and at most n={n}")
    order = np.lexsort((np.arange(V), -counts))  # by count desc, then id asc
    rest = [int(i) for i in order if int(i) not in set(force)][: n - len(force)]
    chosen = np.asarray(rest + force, np.int64)
    return chosen[np.lexsort((chosen, -counts[chosen]))].astype(np.int32)


def coverage(counts: np.ndarray, ids: np.ndarray) -> float:
    """Fraction of corpus token occurrences covered by ``ids``."""
    return float(counts[ids].sum() / max(counts.sum(), 1))


def save_frspec(ids: np.ndarray, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write ``ids`` as .npy (and ``<path>.json`` with ``meta``), atomically."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"FR-Spec file must end in .npy, got {path}")
    with atomic_file(path, "wb") as f:
        np.save(f, np.asarray(ids, np.int32))
    write_json(path.with_suffix(".json"), {"size": int(len(ids)), **(meta or {})}, indent=1)


def check_frspec_ids(ids: Sequence[int] | np.ndarray, vocab_size: int,
                     name: str = "frspec_ids") -> np.ndarray:
    """``ids`` as int32 after checking they are a non-empty 1-D list of distinct integer token ids
    of the target's vocabulary; the error names ``name`` (the argument or the file)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) \
            or ids.min() < 0 or ids.max() >= vocab_size or np.unique(ids).size != ids.size:
        lo, hi = (ids.min(), ids.max()) if ids.size else ("-", "-")
        raise ValueError(f"{name} must be distinct ids in [0, {vocab_size}) (token ids of the "
                         f"target's vocabulary); got {ids.size} ids in [{lo}, {hi}]")
    return ids.astype(np.int32)


def load_frspec(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """Read an FR-Spec id file and check it against the model's vocabulary."""
    return check_frspec_ids(np.load(Path(path)), vocab_size, f"{path}: FR-Spec ids")


@jax.jit
def _take_columns(weight: jax.Array, vocab_ids: jax.Array) -> jax.Array:
    return jnp.take(weight, vocab_ids, axis=1)


def frspec_head(params: Params, cfg: ModelConfig, vocab_ids: jax.Array) -> jax.Array:
    """The target's output projection restricted to ``vocab_ids``, ``[d, len(vocab_ids)]``: the
    FR-Spec draft head's weight, gathered once per target weights (an engine keeps it) rather
    than inside every draft step, where the gather read the full vocabulary's rows each round
    (about a tenth of a tiny-model round on CPU, in a profile of the compiled step)."""
    return _take_columns(output_weight(params, cfg), vocab_ids)
