"""cpmjax: MiniCPM4 in JAX (model, InfLLM v2, muP training, serving, HF conversion)."""

from cpmjax.api import Model, load, save_hf
from cpmjax.config import ConfigError, ModelConfig, SparseConfig

__all__ = ["ConfigError", "Model", "ModelConfig", "SparseConfig", "load", "save_hf"]
