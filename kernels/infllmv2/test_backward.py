"""Gradients of the Pallas stage-2 kernels (interpret mode) vs autodiff through the jnp oracle."""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels.infllmv2 import sparse_attention
from kernels.infllmv2.documents import kernel_slots
from kernels.infllmv2.pallas_op import group_queries, ungroup_queries
from kernels.infllmv2.pallas_tpu import sparse_attention_fwd as tpu_fwd
from kernels.infllmv2.pallas_tpu_bwd import sparse_attention_bwd as tpu_bwd
from kernels.infllmv2.reference import sparse_attention_reference
from kernels.infllmv2.test_infllmv2 import compile_for_v5e

BS = 4


def _case(seed: int, tq: int, cache_len: int, h: int, kv: int, d: int, topk: int, dtype):
    """Random q/k/v/dO and block lists: distinct random blocks, the last slot -1, and block 1
    selected by no query (its dK/dV must be exactly 0)."""
    tk = cache_len + tq
    ks = jax.random.split(jax.random.key(seed), 4)
    q, do = (jax.random.normal(kk, (1, tq, h, d), jnp.float32).astype(dtype) for kk in ks[::3])
    k, v = (jax.random.normal(kk, (1, tk, kv, d), jnp.float32).astype(dtype) for kk in ks[1:3])
    nb = -(-tk // BS)
    others = np.delete(np.arange(nb), 1)  # block 1 is never selected; the rest distinct per row
    perm = others[np.random.RandomState(seed).rand(1, kv, tq, nb - 1).argsort(-1)]
    idx = np.full((1, kv, tq, topk), -1, np.int32)
    idx[..., : topk - 1] = perm[..., : topk - 1]
    return q, k, v, do, jnp.asarray(idx)


def _grads(impl: str, q, k, v, do, idx, cache_len: int):
    def loss(q_, k_, v_):
        if impl == "reference":
            o = sparse_attention_reference(q_, k_, v_, idx, block_size=BS, cache_len=cache_len)
        else:
            o = sparse_attention(q_, k_, v_, idx, block_size=BS, cache_len=cache_len,
                                 implementation=impl)
        return (o.astype(jnp.float32) * do.astype(jnp.float32)).sum()
    return jax.grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("impl", ["pallas_interpret", "pallas_gpu_interpret"])
@pytest.mark.parametrize("h,kv,d", [(2, 2, 8), (4, 2, 8), (16, 1, 4)])  # G = 1, 2, 16
def test_grads_f32(impl, h, kv, d):
    cache_len = 3  # Tk = 22: not a multiple of the block size; chunked prefill
    q, k, v, do, idx = _case(0, 19, cache_len, h, kv, d, 4, jnp.float32)
    got = _grads(impl, q, k, v, do, idx, cache_len)
    want = _grads("reference", q, k, v, do, idx, cache_len)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")
    for a in got[1:]:  # block 1 (keys 4..7) is selected by no query
        assert (np.asarray(a)[:, BS: 2 * BS] == 0).all()


@pytest.mark.parametrize("impl", ["pallas_interpret", "pallas_gpu_interpret"])
def test_query_chunks_give_the_unchunked_forward_and_grads(impl):
    """Kernel calls over query chunks (the scalar-memory bound of the block ids) with a chunk
    that does not divide Tq: same output and gradients as one call and as the oracle."""
    q, k, v, do, idx = _case(3, 11, 2, 4, 2, 8, 4, jnp.float32)
    whole = sparse_attention(q, k, v, idx, block_size=BS, cache_len=2, implementation=impl,
                             query_chunk=11)
    parts = sparse_attention(q, k, v, idx, block_size=BS, cache_len=2, implementation=impl,
                             query_chunk=4)
    np.testing.assert_allclose(parts, whole, atol=1e-6, rtol=1e-6)

    def loss(chunk):
        return lambda q_, k_, v_: (sparse_attention(
            q_, k_, v_, idx, block_size=BS, cache_len=2, implementation=impl,
            query_chunk=chunk) * do).sum()

    got = jax.grad(loss(4), (0, 1, 2))(q, k, v)
    want = _grads("reference", q, k, v, do, idx, 2)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")


def test_default_query_chunk_fits_scalar_memory():
    from kernels.infllmv2.pallas_op import SMEM_INDEX_ENTRIES, query_chunk_for

    assert query_chunk_for(1, 2, 96, 4096) == 256  # MiniCPM4-8B shapes: 2 KV heads, topk 96
    assert query_chunk_for(1, 2, 96, 100) == 100  # small calls stay whole
    for b, kv, topk in [(1, 2, 96), (4, 2, 96), (1, 8, 16), (64, 8, 96)]:
        c = query_chunk_for(b, kv, topk, 1 << 20)
        assert b * kv * topk * c <= SMEM_INDEX_ENTRIES and c >= 1


@pytest.mark.parametrize("impl", ["pallas_interpret", "pallas_gpu_interpret"])
def test_grads_bf16(impl):
    """bf16 inputs vs the f32 oracle on the same (rounded) inputs: P and dS are cast to bf16
    (eps 2^-8 = 0.0039) before the matmuls, so errors of a few eps times |grad| ~ 1 are expected."""
    q, k, v, do, idx = _case(1, 13, 2, 4, 2, 16, 3, jnp.bfloat16)
    got = _grads(impl, q, k, v, do, idx, 2)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = _grads("reference", *f32, idx, 2)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=4e-2, rtol=4e-2,
                                   err_msg=f"d{name}")


def test_tpu_backward_under_interpret_params():
    """InterpretParams raises on out-of-range block DMAs, e.g. from a bad inverse index; the
    dK/dV kernel adds into the accumulators it is given (query chunks rely on it)."""
    q, k, v, do, idx = _case(2, 10, 1, 4, 2, 8, 3, jnp.float32)
    pos = (1 + jnp.arange(10, dtype=jnp.int32))[None]
    codes, qg, dog = kernel_slots(idx, None, pos, BS), group_queries(q, 2), group_queries(do, 2)
    kw = dict(block_size=BS, scale=8 ** -0.5, interpret=pltpu.InterpretParams())
    out, lse = tpu_fwd(qg, k, v, codes, pos, return_lse=True, **kw)
    delta = (dog * out).sum(-1, keepdims=True)
    acc = jnp.ones((1, 2, 3, BS, 8), jnp.float32)
    dq, dk, dv = tpu_bwd(qg, k, v, codes, pos, lse, delta, dog, acc, acc, **kw)
    want = _grads("reference", q, k, v, do, idx, 1)
    np.testing.assert_allclose(ungroup_queries(dq), want[0], atol=2e-5, rtol=2e-5)
    for got, w in zip((dk, dv), want[1:]):  # [B, KV, nb, bs, D] -> [B, Tk, KV, D]
        rows = (got - 1).transpose(0, 2, 3, 1, 4).reshape(1, 12, 2, 8)[:, :11]
        np.testing.assert_allclose(rows, w, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_backward_aot_compiles_for_v5e():
    """The gradient on a packed row (3 documents, none block-aligned: the two-range slots)."""
    seg = jnp.asarray(np.repeat([0, 1, 2], [100, 57, 99]))[None]

    def grads(q, k, v, i):
        return jax.grad(lambda *a: sparse_attention(*a, i, block_size=64, segment_ids=seg).astype(
            jnp.float32).sum(), (0, 1, 2))(q, k, v)

    compiled = compile_for_v5e(grads)
    assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dQ, dK/dV


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_long_query_grad_compiles_for_v5e_only_in_chunks():
    """MiniCPM4-8B attention shapes (KV 2, topk 96) at 1K queries: one kernel call's block ids
    overflow v5e's scalar memory; the default query chunks (256) compile, as one kernel of each
    kind under a loop over the chunks (so the kernel count does not grow with length)."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(topologies.get_topology_desc(topology_name="v5e:2x2",
                                                      platform="tpu").devices[:1]), ("x",))
    t, kv, topk = 1024, 2, 96
    args = [jax.ShapeDtypeStruct(s, dt) for s, dt in [
        ((1, t, 16, 128), jnp.bfloat16), ((1, t, kv, 128), jnp.bfloat16),
        ((1, t, kv, 128), jnp.bfloat16), ((1, kv, t, topk), jnp.int32)]]

    def compiled(chunk):
        def grads(q, k, v, i):
            return jax.grad(lambda *a: sparse_attention(
                *a, i, block_size=64, implementation="pallas_tpu", query_chunk=chunk
            ).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)
        step = jax.shard_map(grads, mesh=mesh, in_specs=(P(),) * 4, out_specs=P(),
                             check_vma=False)
        return jax.jit(step).lower(*args).compile()

    assert compiled(None).as_text().count("tpu_custom_call") == 3  # 4 chunks, 3 kernels
    with pytest.raises(Exception, match="SMEM|RESOURCE_EXHAUSTED|scalar memory"):
        compiled(t)
