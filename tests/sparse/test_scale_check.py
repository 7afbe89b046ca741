"""The model's sparse paths compiled for a TPU chip by libtpu on this CPU host
(`cpmjax.sparse.scale_check`): the decoder layer reaches the Pallas kernels in training on
packed rows and in decode from a KV cache. Real shapes are `launch/aot_sparse_layer.py`'s job
(bench/results/aot_sparse_layer_tpu.jsonl); these are tiny."""
from __future__ import annotations

import importlib.util

import pytest

from cpmjax.config import ModelConfig
from cpmjax.sparse import scale_check
from tests.conftest import tiny_hf_config
from tests.sparse.test_sparse_model import SPARSE, make_cfg

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed")


def test_packed_train_layer_runs_the_pallas_kernels():
    """Forward + backward of one layer on a packed row: the forward, dQ and dK/dV kernels;
    with a dense_len, the lax.cond's wider branch (some document in dense mode) has its own."""
    for dense_len, kernels in ((-1, 3), (64, 6)):
        c = scale_check.compile_train_layer(make_cfg(dense_len=dense_len), "v5e:2x2", 256, 3)
        assert scale_check.figures(c)["pallas_kernels"] == kernels


@pytest.mark.parametrize("head_dim,batch", [(128, 4), (64, 1), (64, 4)])
def test_decode_layer_reads_the_cache_in_place(head_dim, batch):
    """A decode step with 2 KV heads and MiniCPM4-8B's head_dim (128) or MiniCPM4-0.5B's (64,
    whose cache is lane-packed, `cpmjax.model.cache.lane_packed`): one Pallas kernel (the step's
    lax.cond has no dense-mode branch here), and no cache-sized layout copy (viewing K/V as
    [B, S, KV*D] for the kernel, gathering the compressed-key windows from the cache in one
    batched gather, a [B, S, 2, 64] cache, and pooling a lane-packed run as heads each made
    libtpu copy the cache every step)."""
    cfg = ModelConfig.from_hf_config(tiny_hf_config(
        sparse_config=SPARSE, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        hidden_size=4 * head_dim, rope_scaling=None, max_position_embeddings=4096))
    assert cfg.head_dim == head_dim
    cache_len = 2048
    c = scale_check.compile_decode_layer(cfg, "v5e:2x2", cache_len, batch)
    fig = scale_check.figures(c, batch * cache_len * 2 * cfg.head_dim)
    assert (fig["pallas_kernels"], fig["cache_sized_copies"]) == (1, 0)
