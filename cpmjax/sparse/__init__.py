"""InfLLM v2 sparse attention in the model: dense/sparse switch, per-document selection, decode caches.

The standalone op lives in ``kernels/infllmv2`` (stage 1 ``select_blocks``, stage 2
``sparse_attention``); this package is the model-side glue called from
``cpmjax.model.attention.attend``.
"""
from cpmjax.sparse.attend import sparse_attend
from cpmjax.sparse.cache import init_compressed, update_compressed

__all__ = ["init_compressed", "sparse_attend", "update_compressed"]
