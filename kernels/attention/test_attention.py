"""Every dense attention implementation against the jnp oracle, forward and gradients."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import REGISTRY, dot_product_attention
from kernels.attention.cudnn_gpu import segment_offsets
from kernels.attention.xla_chunked import attention_xla_chunked

ON_GPU = jax.default_backend() == "gpu"
# what runs on this host against the reference: the TPU kernel only in interpret mode, cuDNN
# only on a GPU
RUNNABLE = [n for n in REGISTRY.names if n not in ("splash", "reference")
            and (n != "cudnn" or ON_GPU)]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed")


def _inputs(B: int, T: int, H: int, KV: int, D: int, dtype=jnp.float32, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, T, KV, D), dtype)
    v = jax.random.normal(ks[2], (B, T, KV, D), dtype)
    w = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)  # cotangent weights
    return q, k, v, w


def _packed(B: int, T: int, cuts: list[list[int]]) -> tuple[jax.Array, jax.Array]:
    """Segment ids and per-document positions of rows cut at the given offsets."""
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b, row in enumerate(cuts):
        starts = [0, *row]
        for d, (a, e) in enumerate(zip(starts, [*row, T])):
            seg[b, a:e], pos[b, a:e] = d + 1, np.arange(e - a)
    return jnp.asarray(seg), jnp.asarray(pos)


def _self_attention(impl: str, q, k, v, seg, pos):
    return dot_product_attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg,
                                 keys_are_queries=True, implementation=impl)


def _grads(fn, q, k, v, w):
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("impl", RUNNABLE)
@pytest.mark.parametrize("packed", [False, True], ids=["one_doc", "packed"])
def test_self_attention_matches_reference(impl, packed):
    # T=200 is not a multiple of any block: padding paths run too
    B, T, H, KV, D = 2, 200, 4, 2, 16
    q, k, v, w = _inputs(B, T, H, KV, D)
    seg, pos = _packed(B, T, [[70, 71], [150]]) if packed else (None, None)
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    got = jax.jit(lambda *a: _self_attention(impl, *a, seg, pos))
    want = jax.jit(lambda *a: _self_attention("reference", *a, seg, pos))
    np.testing.assert_allclose(got(q, k, v), want(q, k, v), atol=2e-5, rtol=2e-5)
    for g, r in zip(_grads(got, q, k, v, w), _grads(want, q, k, v, w)):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)


def test_chunked_path_with_many_blocks_matches_reference():
    """Small blocks: many query and key blocks, skipped and visited ones, padded tails; packed
    self-attention and queries into a cache (positions, a padding query)."""
    B, T, H, KV, D = 2, 150, 4, 1, 8
    q, k, v, w = _inputs(B, T, H, KV, D, seed=1)
    seg, pos = _packed(B, T, [[60], [33, 120]])
    cache_pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    q_pos = jnp.where(jnp.arange(T) < 100, jnp.arange(T) + 40, -1)[None].repeat(B, 0)
    cases = [dict(q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, keys_are_queries=True),
             dict(q_pos=q_pos, kv_pos=cache_pos, q_seg=None, kv_seg=None,
                  keys_are_queries=False)]
    for kw in cases:
        got = jax.jit(lambda *a: attention_xla_chunked(*a, scale=0.3, q_chunk=64, kv_chunk=32,
                                                       **kw))
        want = jax.jit(lambda *a: dot_product_attention(*a, scale=0.3,
                                                        implementation="reference", **kw))
        np.testing.assert_allclose(got(q, k, v), want(q, k, v), atol=2e-5, rtol=2e-5)
        for g, r in zip(_grads(got, q, k, v, w), _grads(want, q, k, v, w)):
            np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("impl", RUNNABLE)
def test_queries_into_a_kv_cache(impl):
    """Decode / prefill-chunk layout: keys at absolute positions, a padding query (-1) sees
    nothing and gets zeros; kernels that cover only self-attention fall back to xla."""
    B, S, H, KV, D = 2, 160, 4, 2, 16
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (B, 3, H, D))
    k, v = (jax.random.normal(x, (B, S, KV, D)) for x in ks[1:])
    q_pos = jnp.array([[40, 41, 42], [130, 131, -1]])
    kv_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    kw = dict(q_pos=q_pos, kv_pos=kv_pos, keys_are_queries=False)
    fn = lambda name: jax.jit(lambda *a: dot_product_attention(*a, implementation=name, **kw))
    got, want = fn(impl)(q, k, v), fn("reference")(q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    assert not np.any(np.asarray(got[1, 2]))
    w = jnp.ones(q.shape)
    for g, r in zip(_grads(fn(impl), q, k, v, w), _grads(fn("reference"), q, k, v, w)):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("impl", [n for n in RUNNABLE if n != "reference"])
def test_bfloat16_inputs_stay_close_to_float32(impl):
    B, T, H, KV, D = 1, 256, 4, 2, 32
    q, k, v, _ = _inputs(B, T, H, KV, D)
    seg, pos = _packed(B, T, [[100]])
    want = _self_attention("reference", q, k, v, seg, pos)
    bf = lambda x: x.astype(jnp.bfloat16)
    got = _self_attention(impl, bf(q), bf(k), bf(v), seg, pos)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)


def test_chunked_memory_does_not_grow_with_t_squared():
    """fwd+bwd of the XLA path at T=8192 compiles with temporaries far below one T x T score
    matrix (256 MiB per head in float32), while the reference needs several."""
    B, T, H, KV, D = 1, 8192, 2, 1, 16
    shapes = [jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)] + [
        jax.ShapeDtypeStruct((B, T, KV, D), jnp.float32)] * 2
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    def temp_bytes(impl: str) -> int:
        loss = lambda q, k, v: dot_product_attention(q, k, v, q_pos=pos, kv_pos=pos,
                                                     keys_are_queries=True,
                                                     implementation=impl).sum()
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    square = T * T * 4
    assert temp_bytes("xla") < square / 16
    assert temp_bytes("reference") > square


def test_bad_shapes_and_half_given_segments_are_refused():
    q, k, v, _ = _inputs(1, 8, 4, 2, 8)
    pos = jnp.zeros((1, 8), jnp.int32)
    k3 = jnp.concatenate([k, k[:, :, :1]], axis=2)
    with pytest.raises(ValueError, match="H % KV"):
        dot_product_attention(q, k3, k3, q_pos=pos, kv_pos=pos)
    with pytest.raises(ValueError, match="for both queries and keys"):
        dot_product_attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=pos)
    with pytest.raises(ValueError, match="Tq == Tk"):
        dot_product_attention(q, k[:, :4], v[:, :4], q_pos=pos, kv_pos=pos[:, :4],
                              keys_are_queries=True)
    with pytest.raises(ValueError, match="unknown implementation"):
        dot_product_attention(q, k, v, q_pos=pos, kv_pos=pos, implementation="flash9")


def test_segment_offsets_layout():
    seg = jnp.array([[1, 1, 2, 2, 2, 3], [5, 5, 5, 5, 5, 5]])
    offsets, lengths = segment_offsets(seg, 3)
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1], [0, -1, -1, -1]])
    np.testing.assert_array_equal(lengths, [[2, 3, 1], [6, -1, -1]])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (none was available to this project)")
def test_cudnn_packed_rows_on_gpu():
    B, T, H, KV, D = 2, 1024, 8, 2, 64
    q, k, v, w = (x.astype(jnp.bfloat16) for x in _inputs(B, T, H, KV, D))
    seg, pos = _packed(B, T, [[300, 301], [700]])
    got = lambda *a: _self_attention("cudnn", *a, seg, pos)
    want = lambda *a: _self_attention("xla", *a, seg, pos)
    assert "cudnn" in jax.jit(got).lower(q, k, v).compile().as_text()
    np.testing.assert_allclose(got(q, k, v).astype(jnp.float32),
                               want(q, k, v).astype(jnp.float32), atol=2e-2, rtol=2e-2)
    for g, r in zip(_grads(got, q, k, v, w.astype(jnp.bfloat16)),
                    _grads(want, q, k, v, w.astype(jnp.bfloat16))):
        np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), atol=5e-2,
                                   rtol=5e-2)


@needs_libtpu
def test_splash_lowers_to_tpu_kernels_forward_and_backward():
    """The TPU kernels compile for a TPU (libtpu AOT), inside shard_map: forward, dQ, dK/dV."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, PartitionSpec as P

    devices = topologies.get_topology_desc(topology_name="v5e:1x1", platform="tpu").devices
    mesh = Mesh(np.asarray(devices).reshape(1), ("x",))
    B, T, H, KV, D = 1, 1024, 4, 2, 128
    seg, pos = _packed(B, T, [[300]])

    def loss(q, k, v):
        out = _self_attention("splash", q, k, v, seg, pos)
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh, in_specs=(P(),) * 3,
                          out_specs=(P(),) * 3, check_vma=False)
    args = [jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)] + [
        jax.ShapeDtypeStruct((B, T, KV, D), jnp.bfloat16)] * 2
    hlo = jax.jit(grads).lower(*args).compile().as_text()
    assert hlo.count("tpu_custom_call") >= 3
