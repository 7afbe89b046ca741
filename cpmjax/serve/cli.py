"""What the serving launchers share: the absl flags for a model source, its quantization and a
speculative draft, and loading them with clear refusals of combinations that make no sense."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from absl import app, flags

from cpmjax import presets
from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.serve.generate import Speculative

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF MiniCPM folder or cpmjax checkpoint")
TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                "tokenizer folder/tokenizer.json (default: the checkpoint's own)")
PRESET = flags.DEFINE_string("random_preset", None,
                             "no checkpoint: random weights of this preset (e.g. tiny), for tests")
QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "rtn", "gptq", "pgptq"],
                             "weight-only quantization of the target's decoder linears at load "
                             "(gptq/pgptq calibrate on the default corpus's train split)")
QUANT_BITS = flags.DEFINE_enum("quant_bits", "4", ["4", "8"], "bits per weight with --quantize")
QUANT_GROUP = flags.DEFINE_integer("quant_group", 128, "quantization group size (input dim)")
CALIB_ROWS = flags.DEFINE_integer("calib_rows", 32, "GPTQ calibration rows of 256 tokens")
DRAFT = flags.DEFINE_string("draft", None,
                            "speculative decoding: an EAGLE draft .safetensors (CPM.cu layout, "
                            "cpmjax.model.mtp.save_mtp) or a training run with an MTP head")
SPEC_K = flags.DEFINE_integer("spec_k", 3, "draft tokens per verify step (with --draft)")
DRAFT_QUANTIZE = flags.DEFINE_enum("draft_quantize", "none", ["none", "rtn"],
                                   "int4 RTN of the draft layer (only with a quantized target)")
FRSPEC = flags.DEFINE_string("frspec", None, "FR-Spec token ranking .npy (launch/build_frspec.py)")
FRSPEC_SIZE = flags.DEFINE_integer("frspec_size", 0,
                                   "draft vocabulary: the N most frequent ids of --frspec (0 = all)")


def _quantize(cfg: ModelConfig, params: Any, tokenizer_path: str | None) -> Any:
    from cpmjax.quant import quantize_params

    calib = None
    if QUANTIZE.value != "rtn":
        from cpmjax.data.corpus import build_default_corpus
        from cpmjax.data.pipeline import Source, eval_batches
        from cpmjax.data.tokenizer import get_or_build_default_tokenizer

        cache = ".cache/cpmjax"
        tok = tokenizer_path or str(get_or_build_default_tokenizer(cache, cfg.vocab_size))
        calib = eval_batches(Source(str(build_default_corpus(cache) / "train.jsonl")), tok, 256,
                             CALIB_ROWS.value, 1)
    return quantize_params(cfg, params, QUANTIZE.value, bits=int(QUANT_BITS.value),
                           group_size=QUANT_GROUP.value, calibration=calib)


def load_model() -> tuple[ModelConfig, Any, Any]:
    """(config, params, tokenizer or None) from --checkpoint or --random_preset, quantized as
    --quantize asks."""
    from cpmjax.data.tokenizer import load_tokenizer

    if (CHECKPOINT.value is None) == (PRESET.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --random_preset")
    tok_path = TOKENIZER.value
    if CHECKPOINT.value is not None:
        import cpmjax

        model = cpmjax.load(CHECKPOINT.value)
        cfg, params, tok = model.config, model.params, model.tokenizer
        own = cpmjax.api.tokenizer_file(CHECKPOINT.value, cfg.vocab_size)
        tok_path = tok_path or (None if own is None else str(own))
    else:
        if PRESET.value not in presets.PRESETS:
            raise app.UsageError(f"--random_preset must be one of {sorted(presets.PRESETS)}")
        cfg = ModelConfig.from_hf_config(presets.PRESETS[PRESET.value]())
        params, tok = init_params(cfg, jax.random.PRNGKey(0)), None
    if TOKENIZER.value is not None:
        tok = load_tokenizer(TOKENIZER.value)
    if QUANTIZE.value != "none":
        params = _quantize(cfg, params, tok_path)
    return cfg, params, tok


def load_speculative(cfg: ModelConfig) -> Speculative | None:
    """The --draft settings as a :class:`Speculative`, or None without --draft; refuses flags
    that would be ignored or cannot work (naming the flag)."""
    import numpy as np

    given = {name: flags.FLAGS[name].present for name in
             ("spec_k", "frspec", "frspec_size", "draft_quantize")}
    if DRAFT.value is None:
        extra = sorted(n for n, present in given.items() if present)
        if extra:
            raise app.UsageError(f"--{', --'.join(extra)} only apply with --draft")
        return None
    if SPEC_K.value < 1:
        raise app.UsageError(f"--spec_k must be >= 1, got {SPEC_K.value}")
    if FRSPEC_SIZE.value and FRSPEC.value is None:
        raise app.UsageError("--frspec_size needs --frspec (the token ranking file)")
    draft = load_draft(cfg, DRAFT.value)
    if DRAFT_QUANTIZE.value != "none":
        if QUANTIZE.value == "none":
            raise app.UsageError(
                "--draft_quantize with a full-precision target gives no speedup (the target's "
                "cost dominates and acceptance drops; CPM.cu issue 4): quantize the target too")
        from cpmjax.quant.qforward import quantize_draft

        draft = quantize_draft(cfg, draft)
    ids = None
    if FRSPEC.value is not None:
        from cpmjax.serve.frspec import load_frspec

        ids = load_frspec(FRSPEC.value, cfg.vocab_size)
        if FRSPEC_SIZE.value < 0 or FRSPEC_SIZE.value > ids.size:
            raise app.UsageError(f"--frspec_size must be in [0, {ids.size}] (the size of "
                                        f"{FRSPEC.value}), got {FRSPEC_SIZE.value}")
        ids = np.asarray(ids[:FRSPEC_SIZE.value or ids.size])
    return Speculative(draft, SPEC_K.value, ids)


def load_draft(cfg: ModelConfig, path: str) -> Any:
    """Draft params from an EAGLE safetensors file or a training run that kept an MTP head; the
    draft must have been built for this target's shapes."""
    from cpmjax.model.mtp import load_mtp
    from cpmjax.train.checkpoint import load_mtp_params

    p = Path(path)
    if p.is_file():
        return load_mtp(cfg, p)
    if not p.exists():
        raise FileNotFoundError(f"--draft: no such file or training run: {p}")
    draft_cfg, draft = load_mtp_params(p)
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "intermediate_size"):
        if getattr(draft_cfg, field) != getattr(cfg, field):
            raise ValueError(f"--draft {p} was trained for {field}={getattr(draft_cfg, field)} "
                             f"but the target has {getattr(cfg, field)}")
    return draft
