"""InfLLM v2 trainable sparse attention (MiniCPM4), standalone JAX op. See README.md."""
from .api import (ATTENTION, SELECTION, default_implementation, dense_slots, select_blocks,
                  select_blocks_at, sparse_attention, sparse_attention_at)

__all__ = ["ATTENTION", "SELECTION", "default_implementation", "dense_slots", "select_blocks",
           "select_blocks_at", "sparse_attention", "sparse_attention_at"]
