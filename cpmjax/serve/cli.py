"""What the serving launchers share: the absl flags for a model source and loading it."""

from __future__ import annotations

from typing import Any

import jax
from absl import flags

from cpmjax import presets
from cpmjax.config import ModelConfig
from cpmjax.model import init_params

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF MiniCPM folder or cpmjax checkpoint")
TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                "tokenizer folder/tokenizer.json (default: the checkpoint's own)")
PRESET = flags.DEFINE_string("random_preset", None,
                             "no checkpoint: random weights of this preset (e.g. tiny), for tests")


def load_model() -> tuple[ModelConfig, Any, Any]:
    """(config, params, tokenizer or None) from --checkpoint or --random_preset."""
    from cpmjax.data.tokenizer import load_tokenizer

    if (CHECKPOINT.value is None) == (PRESET.value is None):
        raise flags.ValidationError("give exactly one of --checkpoint and --random_preset")
    if CHECKPOINT.value is not None:
        import cpmjax

        model = cpmjax.load(CHECKPOINT.value)
        cfg, params, tok = model.config, model.params, model.tokenizer
    else:
        if PRESET.value not in presets.PRESETS:
            raise flags.ValidationError(f"--random_preset must be one of {sorted(presets.PRESETS)}")
        cfg = ModelConfig.from_hf_config(presets.PRESETS[PRESET.value]())
        params, tok = init_params(cfg, jax.random.PRNGKey(0)), None
    if TOKENIZER.value is not None:
        tok = load_tokenizer(TOKENIZER.value)
    return cfg, params, tok
