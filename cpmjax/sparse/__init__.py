"""InfLLM v2 sparse attention in the model: the dense/sparse switch per sequence, packed rows,
decode caches.

The standalone op lives in ``kernels/infllmv2`` (stage 1 ``select_blocks``, stage 2
``sparse_attention``, their per-row-position variants and the implementation registries); this
package is the model-side glue called from ``cpmjax.model.attention.attend``.
"""
from cpmjax.sparse.attend import sparse_attend
from cpmjax.sparse.cache import init_compressed, truncate_compressed, update_compressed

__all__ = ["init_compressed", "sparse_attend", "truncate_compressed", "update_compressed"]
