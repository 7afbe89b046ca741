"""Dense causal attention with packed documents and GQA (flash on every platform). See README.md."""
from .api import MANUAL_PARTITIONING, REGISTRY, dot_product_attention
from .masking import visible
from .reference import masked_attention

__all__ = ["MANUAL_PARTITIONING", "REGISTRY", "dot_product_attention", "masked_attention",
           "visible"]
