"""The experiment config: model + data + optimizer + mesh + checkpoint, as one ml_collections
ConfigDict that absl ``config_flags`` can override field by field (``--config.a.b=value``)."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def experiment_config(model: Mapping[str, Any], name: str) -> ml_collections.ConfigDict:
    """Base experiment around a model preset (an HF config.json dict)."""
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.model = ml_collections.ConfigDict(dict(model))
    return cfg
