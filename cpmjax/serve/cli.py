"""What the serving launchers share: loading a model source (checkpoint or random preset), its
quantization and a speculative draft from plain arguments, refusing combinations that make no
sense with messages that name the launcher flag (``--name``). No flags are defined here: the
launchers define them (``launch/model_flags.py``) and pass the values in."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from cpmjax import presets
from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.serve.generate import Speculative

QUANTIZE = ("none", "rtn", "gptq", "pgptq")


class UsageError(ValueError):
    """Arguments that cannot work together; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A target model: ``checkpoint`` (HF MiniCPM folder, cpmjax checkpoint or run dir) or
    ``random_preset`` (random weights, for tests), its tokenizer, and weight-only quantization."""

    checkpoint: str | None = None
    random_preset: str | None = None
    tokenizer: str | None = None
    quantize: str = "none"
    quant_bits: int = 4
    quant_group: int = 128
    calib_rows: int = 32


@dataclasses.dataclass(frozen=True)
class DraftSource:
    """Speculative decoding settings; ``given``: the names set explicitly (so settings that would
    be ignored without a draft can be refused)."""

    draft: str | None = None
    spec_k: int = 3
    draft_quantize: str = "none"
    frspec: str | None = None
    frspec_size: int = 0
    given: frozenset[str] = frozenset()
    draft_form: str = "auto"  # auto | one of cpmjax.model.mtp.DRAFT_FORMS
    spec_tree: str | None = None  # "depth,topk,size": EAGLE-2 tree drafting
    spec_policy: str = "measured"  # cpmjax.serve.tree_engine.POLICIES


def _quantize(cfg: ModelConfig, params: Any, src: ModelSource, tokenizer_path: str | None) -> Any:
    from cpmjax.quant import quantize_params

    calib = None
    if src.quantize != "rtn":
        from cpmjax.data.corpus import build_default_corpus
        from cpmjax.data.pipeline import Source, eval_batches
        from cpmjax.data.tokenizer import get_or_build_default_tokenizer

        cache = ".cache/cpmjax"
        tok = tokenizer_path or str(get_or_build_default_tokenizer(cache, cfg.vocab_size))
        calib = eval_batches(Source(str(build_default_corpus(cache) / "train.jsonl")), tok, 256,
                             src.calib_rows, 1)
    return quantize_params(cfg, params, src.quantize, bits=src.quant_bits,
                           group_size=src.quant_group, calibration=calib)


def load_model(src: ModelSource) -> tuple[ModelConfig, Any, Any]:
    """(config, params, tokenizer or None) of ``src``, quantized as it asks."""
    from cpmjax.data.tokenizer import load_tokenizer

    if (src.checkpoint is None) == (src.random_preset is None):
        raise UsageError("give exactly one of --checkpoint and --random_preset")
    if src.quantize not in QUANTIZE:
        raise UsageError(f"--quantize must be one of {QUANTIZE}, got {src.quantize!r}")
    tok_path = src.tokenizer
    if src.checkpoint is not None:
        import cpmjax

        model = cpmjax.load(src.checkpoint)
        cfg, params, tok = model.config, model.params, model.tokenizer
        own = cpmjax.api.tokenizer_file(src.checkpoint, cfg.vocab_size)
        tok_path = tok_path or (None if own is None else str(own))
    else:
        if src.random_preset not in presets.PRESETS:
            raise UsageError(f"--random_preset must be one of {sorted(presets.PRESETS)}")
        cfg = ModelConfig.from_hf_config(presets.PRESETS[src.random_preset]())
        params, tok = init_params(cfg, jax.random.PRNGKey(0)), None
    if src.tokenizer is not None:
        tok = load_tokenizer(src.tokenizer)
    if src.quantize != "none":
        params = _quantize(cfg, params, src, tok_path)
    return cfg, params, tok


def parse_tree_shape(text: str, flag: str = "spec_tree") -> Any:
    """The drafting tree ``"depth,topk,size"`` (depth >= 1) as a ``cpmjax.serve.tree.TreeShape``;
    one parser for every launcher that takes a tree, refusing with the flag's name."""
    from cpmjax.serve.tree import check_tree_shape

    try:
        tree = check_tree_shape(text.split(","))
    except ValueError as e:
        raise UsageError(f"--{flag}: {e}") from None
    if tree.depth < 1:
        raise UsageError(f"--{flag}: depth must be >= 1, got {tree.depth}")
    return tree


def load_speculative(cfg: ModelConfig, src: DraftSource, target_quantized: bool = False
                     ) -> Speculative | None:
    """``src`` as a :class:`Speculative`, or None without a draft; refuses settings that would be
    ignored or cannot work (naming the flag)."""
    import numpy as np

    if src.draft is None:
        extra = sorted(src.given & {"spec_k", "frspec", "frspec_size", "draft_quantize",
                                    "draft_form", "spec_tree", "spec_policy"})
        if extra:
            raise UsageError(f"--{', --'.join(extra)} only apply with --draft")
        return None
    if src.spec_k < 1:
        raise UsageError(f"--spec_k must be >= 1, got {src.spec_k}")
    if src.frspec_size and src.frspec is None:
        raise UsageError("--frspec_size needs --frspec (the token ranking file)")
    if "spec_policy" in src.given and src.spec_tree is None:
        raise UsageError("--spec_policy only applies with --spec_tree")
    tree = None if src.spec_tree is None else parse_tree_shape(src.spec_tree)
    draft, form = load_draft(cfg, src.draft)
    if src.draft_form != "auto":
        form = src.draft_form
    if src.draft_quantize != "none":
        if not target_quantized:
            raise UsageError(
                "--draft_quantize with a full-precision target gives no speedup (the target's "
                "cost dominates and acceptance drops; CPM.cu issue 4): quantize the target too")
        from cpmjax.quant.qforward import quantize_draft

        draft = quantize_draft(cfg, draft)
    ids = None
    if src.frspec is not None:
        from cpmjax.serve.frspec import load_frspec

        ids = load_frspec(src.frspec, cfg.vocab_size)
        if src.frspec_size < 0 or src.frspec_size > ids.size:
            raise UsageError(f"--frspec_size must be in [0, {ids.size}] (the size of "
                             f"{src.frspec}), got {src.frspec_size}")
        ids = np.asarray(ids[:src.frspec_size or ids.size])
    return Speculative(draft, src.spec_k, ids, form, tree, src.spec_policy)


def load_draft(cfg: ModelConfig, path: str) -> tuple[Any, str]:
    """(draft params, form) from an EAGLE safetensors file or a training run that kept an MTP
    head; the draft must have been built for this target's shapes."""
    from cpmjax.model.mtp import draft_form_of, load_mtp
    from cpmjax.train.checkpoint import load_mtp_params, run_draft_form

    p = Path(path)
    if p.is_file():
        return load_mtp(cfg, p), draft_form_of(p)
    if not p.exists():
        raise FileNotFoundError(f"--draft: no such file or training run: {p}")
    draft_cfg, draft = load_mtp_params(p)
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "intermediate_size"):
        if getattr(draft_cfg, field) != getattr(cfg, field):
            raise ValueError(f"--draft {p} was trained for {field}={getattr(draft_cfg, field)} "
                             f"but the target has {getattr(cfg, field)}")
    return draft, run_draft_form(p)
