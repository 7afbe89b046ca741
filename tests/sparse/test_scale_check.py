"""The model's sparse paths compiled for a TPU chip by libtpu on this CPU host
(`cpmjax.sparse.scale_check`): the decoder layer reaches the Pallas kernels in training on
packed rows and in decode from a KV cache. Real shapes are `launch/aot_sparse_layer.py`'s job
(bench/results/aot_sparse_layer_tpu.jsonl); these are tiny."""
from __future__ import annotations

import importlib.util

import pytest

from cpmjax.sparse import scale_check
from tests.sparse.test_sparse_model import make_cfg

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed")


def test_packed_train_layer_runs_the_pallas_kernels():
    """Forward + backward of one layer on a packed row: the forward, dQ and dK/dV kernels;
    with a dense_len, the lax.cond's wider branch (some document in dense mode) has its own."""
    for dense_len, kernels in ((-1, 3), (64, 6)):
        c = scale_check.compile_train_layer(make_cfg(dense_len=dense_len), "v5e:2x2", 256, 3)
        assert scale_check.figures(c)["pallas_kernels"] == kernels


def test_decode_layer_runs_the_pallas_kernel():
    c = scale_check.compile_decode_layer(make_cfg(), "v5e:2x2", 2000, 2)
    assert scale_check.figures(c)["pallas_kernels"] == 1
