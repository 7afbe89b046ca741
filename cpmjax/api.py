"""The public surface: ``cpmjax.load``, ``Model.logits`` / ``Model.generate``, ``cpmjax.save_hf``."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model import forward
from cpmjax.model.params import Params
from cpmjax.tokens import check_token_ids


class Model:
    """A loaded model: its config, its parameters and (when the folder has one) its tokenizer.
    ``path`` and ``tokenizer_path`` say where they were loaded from (None when built in memory);
    exports carry that tokenizer along and never write into ``path``."""

    def __init__(self, config: ModelConfig, params: Params, tokenizer: Any = None,
                 dtype: Any = jnp.float32, path: Path | None = None,
                 tokenizer_path: Path | None = None) -> None:
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.path = path
        self.tokenizer_path = tokenizer_path

    @functools.cached_property
    def _logits_fn(self):
        cfg, dtype = self.config, self.dtype
        return jax.jit(lambda params, tokens: forward(params, cfg, tokens, dtype=dtype).logits)

    def check_tokens(self, tokens: Any) -> np.ndarray:
        """Token ids as an int32 ``[B, T]`` array; a clear error for anything else."""
        arr = check_token_ids(tokens, self.config.vocab_size)
        return arr[None] if arr.ndim == 1 else arr

    def logits(self, tokens: Any) -> jax.Array:
        """float32 ``[B, T, vocab]`` logits for int ``[B, T]`` (or ``[T]``) token ids."""
        return self._logits_fn(self.params, jnp.asarray(self.check_tokens(tokens)))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, speculative: Any = None, **sampling: Any
                 ) -> list[list[int]]:
        """Generated token ids per prompt, through the serving engine's code path."""
        from cpmjax.serve.generate import generate  # serving pulls in more; import on use

        for p in prompts:
            self.check_tokens([list(p)])
        return generate(self.config, self.params, [list(p) for p in prompts],
                        max_new_tokens=max_new_tokens, temperature=temperature,
                        speculative=speculative, **sampling)


def tokenizer_file(folder: str | os.PathLike, vocab_size: int) -> Path | None:
    """The tokenizer a checkpoint was made with: its own ``tokenizer.json`` (HF folders and
    exports), or, for a training run (its workdir, ``checkpoints/`` or one step), the copy the run
    keeps in ``tokenizer/``; None if there is none. Runs written before runs kept a copy fall back
    to their ``data.tokenizer`` / ``data.cache_dir``, which were relative to the directory the run
    was started from: they are tried relative to the run's parent and to the current one."""
    folder = Path(folder).absolute()
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    run = next((d for d in (folder, folder.parent, folder.parent.parent)
                if (d / "experiment.json").is_file()), None)
    if run is None:
        return None
    if (run / "tokenizer" / "tokenizer.json").is_file():
        return run / "tokenizer" / "tokenizer.json"
    data = json.loads((run / "experiment.json").read_text()).get("data", {})
    tok_dir = (Path(data["tokenizer"]) if data.get("tokenizer")
               else Path(data.get("cache_dir", ".cache/cpmjax")) / f"tokenizer-{vocab_size}")
    for base in (run.parent, run.parent.parent, Path.cwd()):
        candidate = base / tok_dir / "tokenizer.json" if not tok_dir.is_absolute() else (
            tok_dir / "tokenizer.json")
        if candidate.is_file():
            return candidate
    return None


def _load_tokenizer(path: Path | None) -> Any:
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def load(path: str | os.PathLike, dtype: Any = jnp.float32) -> Model:
    """Load an HF MiniCPM folder (config.json + safetensors), a cpmjax checkpoint or a packed
    ternary folder (``cpmjax.quant.ternary``; its params stay packed, the engine unpacks them)."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"no checkpoint at {folder}")
    from cpmjax.quant import ternary

    if ternary.is_packed_folder(folder):
        cfg, params, _ = ternary.load_packed(folder)
    elif (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        from cpmjax.convert import load_hf

        cfg, params = load_hf(folder, dtype=dtype)
    else:
        from cpmjax.train.checkpoint import load_model

        cfg, params = load_model(folder, dtype=dtype)
    tok = tokenizer_file(folder, cfg.vocab_size)
    return Model(cfg, params, tokenizer=_load_tokenizer(tok), dtype=dtype,
                 path=folder.absolute(), tokenizer_path=tok)


def save_hf(model: Model, out_dir: str | os.PathLike, format: str = "minicpm",
            **kwargs: Any) -> Path:
    """Export to an HF folder: ``format="minicpm"`` (trust_remote_code) or ``"llama"`` (muP scales
    folded into the weights, loadable by engines without MiniCPM support). The model's tokenizer
    comes along; the folder it was loaded from is never a valid destination."""
    from cpmjax.convert import save_hf as _save_hf

    kwargs.setdefault("tokenizer", model.tokenizer_path)
    kwargs.setdefault("sources", [model.path] if model.path is not None else [])
    return _save_hf(model.config, model.params, out_dir, format=format, **kwargs)
