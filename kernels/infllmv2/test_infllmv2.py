"""Tests for the InfLLM v2 op: kernels (interpret mode) vs the jnp oracle, selection properties."""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from kernels.infllmv2 import ATTENTION, select_blocks, sparse_attention
from kernels.infllmv2.documents import kernel_slots
from kernels.infllmv2.pallas_op import group_queries, ungroup_queries
from kernels.infllmv2.pallas_tpu import sparse_attention_fwd as tpu_fwd
from kernels.infllmv2.reference import (select_blocks_reference, sparse_attention_reference)
from kernels.infllmv2.selection import _block_kernel_windows, pooled_kernels

# Small geometry that keeps MiniCPM4's ratios (kernel = block/2, stride = block/4) so short
# sequences still have many blocks.
SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16)


def _qkv(seed: int, b: int, tq: int, tk: int, h: int, kv: int, d: int, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, tk, kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, tk, kv, d), jnp.float32).astype(dtype)
    return q, k, v


# ---------------------------------------------------------------- stage 1: building blocks

def test_pooled_kernels_are_window_means():
    k = jax.random.normal(jax.random.key(0), (1, 70, 2, 3))
    kc = pooled_kernels(k, 32, 16)  # n = (70-32)//16 + 1 = 3 full kernels
    assert kc.shape == (1, 2, 3, 3)
    for j in range(3):
        np.testing.assert_allclose(kc[0, :, j], k[0, 16 * j: 16 * j + 32].mean(0), atol=1e-6)


def test_block_windows_match_hf_maxpool_for_32_16_64():
    """HF: max_pool1d(kernel 5, stride 4, padding 1) -> block b pools kernels 4b-1 .. 4b+3."""
    ids, valid = _block_kernel_windows(n_blocks=6, n1=20, size=32, stride=16, block_size=64)
    for b in range(6):
        want = [j for j in range(4 * b - 1, 4 * b + 4) if 0 <= j < 20]
        assert list(ids[b][valid[b]]) == want


# ---------------------------------------------------------------- stage 1: selection

@pytest.mark.parametrize("tq,cache_len,lse_approx", [(150, 0, True), (150, 0, False),
                                                     (97, 60, True)])
def test_chunked_selection_equals_reference(tq, cache_len, lse_approx):
    q, k, _ = _qkv(1, 2, tq, cache_len + tq, 8, 2, 16)
    kw = dict(SMALL, topk=4, init_blocks=1, local_blocks=1, lse_approx=lse_approx,
              cache_len=cache_len)
    want = select_blocks_reference(q, k, **kw)
    got = select_blocks(q, k, query_chunk=32, **kw)
    np.testing.assert_array_equal(got, want)


def test_decode_selection_equals_last_row_of_prefill():
    """Decode sees all full kernels (HF non-causal stage 1); for the last token of a prefill the
    causal rule also admits every full kernel, so the two rows must coincide."""
    q, k, _ = _qkv(2, 1, 203, 203, 4, 2, 16)
    kw = dict(SMALL, topk=5, init_blocks=1, local_blocks=2)
    full = select_blocks(q, k, **kw)
    dec = select_blocks(q[:, -1:], k, cache_len=202, **kw)
    np.testing.assert_array_equal(dec[:, :, 0], full[:, :, -1])


@settings(max_examples=10, deadline=None)
@given(t=st.sampled_from([1, 15, 16, 17, 63, 130, 200]), g=st.sampled_from([1, 4]),
       topk=st.integers(1, 8),
       init_blocks=st.integers(0, 2), local_blocks=st.integers(0, 3), seed=st.integers(0, 99),
       lse_approx=st.booleans())
def test_selection_properties(t, g, topk, init_blocks, local_blocks, seed, lse_approx):
    q, k, _ = _qkv(seed, 1, t, t, 2 * g, 2, 8)
    idx = np.asarray(select_blocks(q, k, topk=topk, init_blocks=init_blocks,
                                   local_blocks=local_blocks, lse_approx=lse_approx,
                                   query_chunk=64, **SMALL))
    assert idx.shape == (1, 2, t, topk) and idx.dtype == np.int32
    bs = SMALL["block_size"]
    for row_t in range(t):
        qb = row_t // bs
        forced = {b for b in range(qb + 1) if b < init_blocks or b >= qb - local_blocks}
        for row in idx[0, :, row_t]:
            valid = row[row >= 0]
            assert (row[len(valid):] == -1).all(), row  # -1 only as trailing padding
            assert (np.diff(valid) > 0).all(), row  # strictly ascending
            assert (valid <= qb).all(), row  # nothing in the future
            assert len(valid) <= min(topk, qb + 1)
            if len(forced) <= topk:
                assert forced <= set(valid.tolist()), (row, forced)


@settings(max_examples=8, deadline=None)
@given(t=st.sampled_from([1, 16, 33, 100, 130]), g=st.sampled_from([1, 3, 8]),
       seed=st.integers(0, 99))
def test_sparse_equals_dense_when_all_blocks_fit(t, g, seed):
    q, k, v = _qkv(seed, 1, t, t, 2 * g, 2, 16)
    n_blocks = -(-t // SMALL["block_size"])
    idx = select_blocks(q, k, topk=n_blocks + 1, init_blocks=1, local_blocks=0, **SMALL)
    got = sparse_attention(q, k, v, idx, block_size=SMALL["block_size"], implementation="xla")
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- stage 2: kernels

# every registered stage-2 implementation that runs on this host (pallas_tpu / pallas_gpu need
# their chip; the TPU kernel is compiled for TPU below, the GPU one has never run on a GPU)
ON_HOST = [n for n in ATTENTION.names if n not in ("pallas_tpu", "pallas_gpu")]
IMPLS = [n for n in ON_HOST if n != "reference"]


def test_registry_names_and_defaults():
    assert set(ATTENTION.names) == {"xla", "reference", "pallas_tpu", "pallas_interpret",
                                    "pallas_gpu", "pallas_gpu_interpret"}
    assert ATTENTION.resolve("auto", "tpu") == "pallas_tpu"
    assert ATTENTION.resolve("auto", "gpu") == ATTENTION.resolve("auto", "cpu") == "xla"
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        sparse_attention(*_qkv(0, 1, 4, 4, 2, 1, 8), jnp.zeros((1, 1, 4, 1), jnp.int32),
                         block_size=4, implementation="triton")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g", [1, 4, 16])
def test_attention_forward_and_grads_f32(impl, g):
    t = 91  # not a multiple of the block size
    q, k, v = _qkv(3, 1, t, t, 2 * g, 2, 16)
    idx = select_blocks(q, k, topk=3, init_blocks=1, local_blocks=1, **SMALL)
    assert (np.asarray(idx) == -1).any() and (np.asarray(idx)[..., -1] >= 0).any()
    bs = SMALL["block_size"]

    def loss(fn, q, k, v):
        o = fn(q, k, v)
        return (o * jnp.cos(o)).sum(), o

    ref = lambda q, k, v: sparse_attention_reference(q, k, v, idx, block_size=bs)
    ker = lambda q, k, v: sparse_attention(q, k, v, idx, block_size=bs, implementation=impl)
    (_, o_ref), g_ref = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(ref, q, k, v)
    (_, o_ker), g_ker = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(ker, q, k, v)
    np.testing.assert_allclose(o_ker, o_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_ker, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_bf16_against_f32_reference(impl):
    t = 75
    q, k, v = _qkv(4, 1, t, t, 8, 2, 32, jnp.bfloat16)
    bs = SMALL["block_size"]
    idx = select_blocks(q, k, topk=3, init_blocks=1, local_blocks=1, **SMALL)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = sparse_attention_reference(*f32, idx, block_size=bs)
    got = sparse_attention(q, k, v, idx, block_size=bs, implementation=impl)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)
    gw = jax.grad(lambda q: sparse_attention_reference(q, *f32[1:], idx, block_size=bs).sum())(f32[0])
    gg = jax.grad(lambda q: sparse_attention(q, k, v, idx, block_size=bs, implementation=impl)
                  .astype(jnp.float32).sum())(q)
    np.testing.assert_allclose(gg.astype(jnp.float32), gw, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_continuing_a_cache(impl):
    """Prefill of 40 new tokens after 57 cached ones: queries sit at positions 57..96."""
    cache, tq = 57, 40
    q, k, v = _qkv(5, 2, tq, cache + tq, 4, 2, 16)
    bs = SMALL["block_size"]
    idx = select_blocks(q, k, topk=3, init_blocks=1, local_blocks=1, cache_len=cache, **SMALL)
    want = sparse_attention_reference(q, k, v, idx, block_size=bs, cache_len=cache)
    got = sparse_attention(q, k, v, idx, block_size=bs, cache_len=cache, implementation=impl)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ON_HOST)
def test_rows_without_blocks_are_zero(impl):
    q, k, v = _qkv(6, 1, 20, 20, 2, 1, 8)
    idx = jnp.full((1, 1, 20, 2), -1, jnp.int32).at[:, :, 10:, 0].set(0)
    got = np.asarray(sparse_attention(q, k, v, idx, block_size=16, implementation=impl))
    assert (got[:, :10] == 0).all() and np.isfinite(got).all() and (got[:, 10:] != 0).any()


def test_tpu_kernel_under_interpret_params():
    """InterpretParams simulates TPU memory spaces and raises on out-of-range block DMAs."""
    t = 40
    q, k, v = _qkv(7, 1, t, t, 4, 1, 16)
    idx = select_blocks(q, k, topk=2, init_blocks=1, local_blocks=0, **SMALL)
    want = sparse_attention_reference(q, k, v, idx, block_size=16)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    got = tpu_fwd(group_queries(q, 1), k, v, kernel_slots(idx, None, pos, 16), pos,
                  block_size=16, scale=0.25, interpret=pltpu.InterpretParams())
    np.testing.assert_allclose(ungroup_queries(got), want, atol=1e-5, rtol=1e-5)


def compile_for_v5e(fn):
    """AOT-compile fn(q, k, v, idx) for one chip of a v5e:2x2 topology (libtpu's compiler) at
    MiniCPM4-like kernel shapes: G = 16, D = 128, block 64, bf16."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, PartitionSpec as P

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = Mesh(np.array(topo.devices[:1]), ("x",))
    b, t, h, kv, d, topk = 1, 256, 16, 1, 128, 4
    step = jax.shard_map(fn, mesh=mesh, in_specs=(P(),) * 4, out_specs=P(), check_vma=False)
    args = [jax.ShapeDtypeStruct(s, dt) for s, dt in [((b, t, h, d), jnp.bfloat16),
                                                      ((b, t, kv, d), jnp.bfloat16),
                                                      ((b, t, kv, d), jnp.bfloat16),
                                                      ((b, kv, t, topk), jnp.int32)]]
    return jax.jit(step).lower(*args).compile()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_kernel_aot_compiles_for_v5e():
    """"auto" picks the TPU kernel when the program is compiled for a TPU (on this CPU host)."""
    compiled = compile_for_v5e(lambda q, k, v, i: sparse_attention(q, k, v, i, block_size=64))
    assert compiled.as_text().count("tpu_custom_call") == 1
