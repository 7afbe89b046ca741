"""InfLLM v2 trainable sparse attention (MiniCPM4), standalone JAX op. See README.md."""
from .api import default_implementation, select_blocks, sparse_attention

__all__ = ["default_implementation", "select_blocks", "sparse_attention"]
