"""cpmjax: MiniCPM4 in JAX."""

from cpmjax.config import ConfigError, ModelConfig, SparseConfig

__all__ = ["ConfigError", "ModelConfig", "SparseConfig"]
