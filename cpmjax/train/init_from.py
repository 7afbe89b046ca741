"""Starting a run from a trained model's weights (``train.init_from``, ``train.freeze_target``).

The model may be a cpmjax model checkpoint, a training run (its newest good step) or an HF
MiniCPM folder (whatever :func:`cpmjax.load` reads). Its shape-defining config fields must equal
the experiment's model config; metadata (``torch_dtype``, unmodelled config.json keys) may differ.
Only the weights are taken: the optimizer state, the step and with it the learning-rate schedule
start afresh, so a fine-tuning run warms its learning rate up again, as MiniCPM's SFT and
BitCPM4's QAT stages do (MiniCPM4 report, arXiv 2506.07900 §3.1 and §3.3).
"""

from __future__ import annotations

import dataclasses
import os

from cpmjax.config import ConfigError, ModelConfig
from cpmjax.model.params import Params

_METADATA = ("extra", "source_keys", "torch_dtype")


def _shape_fields(cfg: ModelConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in _METADATA}


def load_matching_params(path: str | os.PathLike, model_cfg: ModelConfig, field: str) -> Params:
    """float32 params of the model at ``path``; a ``ConfigError`` naming ``field`` if it is a
    different model than ``model_cfg``."""
    from cpmjax.api import load  # the loaders pull in conversion code; import on use

    try:
        model = load(path)
    except FileNotFoundError as e:
        raise ConfigError(f"config field {field!r}: {e}") from e
    ours, theirs = _shape_fields(model_cfg), _shape_fields(model.config)
    diff = sorted(k for k in ours if ours[k] != theirs[k])
    if diff:
        raise ConfigError(f"config field {field!r}: the model at {path} differs from this "
                          f"config's model in {', '.join(diff)}")
    return model.params
