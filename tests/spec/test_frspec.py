"""FR-Spec vocabulary: frequency ranking, EOS forced in, file round trip, bad inputs named."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.model.transformer import project_vocab
from cpmjax.serve.frspec import (coverage, frspec_head, load_frspec, save_frspec, token_counts,
                                 top_tokens)
from cpmjax.serve.spec_engine import Speculative, make_engine
from tests.spec.helpers import small_models


def test_top_tokens_ranks_by_frequency_and_forces_eos(tmp_path):
    docs = [[5, 5, 5, 7, 7, 1], [5, 9, 7, 3, 3, 3, 3]]
    counts = token_counts(docs, 12)
    assert counts.tolist() == [0, 1, 0, 4, 0, 4, 0, 3, 0, 1, 0, 0]
    assert top_tokens(counts, 3).tolist() == [3, 5, 7]  # 3 and 5 tie at 4: smaller id first
    ids = top_tokens(counts, 3, force=[2])  # eos never occurs but must be proposable
    assert ids.tolist() == [3, 5, 2]
    assert coverage(counts, ids) == pytest.approx(8 / 13)
    save_frspec(ids, tmp_path / "f.npy", {"coverage": coverage(counts, ids)})
    assert load_frspec(tmp_path / "f.npy", 12).tolist() == [3, 5, 2]
    assert json.loads((tmp_path / "f.json").read_text())["size"] == 3


def test_bad_frspec_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="out of"):
        token_counts([[1, 12]], 12)
    with pytest.raises(ValueError, match="FR-Spec size"):
        top_tokens(np.ones(4), 5)
    np.save(tmp_path / "dup.npy", np.array([1, 1]))
    with pytest.raises(ValueError, match="distinct"):
        load_frspec(tmp_path / "dup.npy", 12)


@pytest.mark.parametrize("tied", [True, False])
def test_frspec_head_gathered_once_projects_as_the_gather_in_the_step(tied):
    cfg, params, draft = small_models(tie_word_embeddings=tied)
    ids = jnp.asarray([5, 0, 17, 3, 96], jnp.int32)
    h = jax.random.normal(jax.random.key(3), (2, 3, cfg.hidden_size))
    head = frspec_head(params, cfg, ids)
    assert head.shape == (cfg.hidden_size, 5)
    full = project_vocab(params, cfg, h)
    np.testing.assert_allclose(project_vocab(params, cfg, h, ids, head), full[..., ids],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(project_vocab(params, cfg, h, ids), full[..., ids], rtol=1e-6,
                               atol=1e-6)
    # an engine keeps the head while the target's weights stay and gathers it again for others
    engine = make_engine(cfg, Speculative(draft, 2, np.asarray(ids)), max_slots=1, max_len=16)
    first = engine._round_args(params)["head"]
    assert engine._round_args(params)["head"] is first
    name = "embed" if tied else "lm_head"
    other = {**params, name: params[name] * 2}
    np.testing.assert_allclose(engine._round_args(other)["head"], 2 * np.asarray(first),
                               rtol=1e-6)
