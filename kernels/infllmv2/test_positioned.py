"""Tests for the InfLLM v2 ops on queries at per-row dynamic positions in a KV cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.infllmv2 import (select_blocks, select_blocks_at, sparse_attention_at)
from kernels.infllmv2.api import ATTENTION
from kernels.infllmv2.reference import sparse_attention_reference
from kernels.infllmv2.selection import pooled_kernels

SEL = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=5, init_blocks=1, local_blocks=1)
S = 150  # cache length, not a multiple of the block size


def _cache(seed: int, b: int, tq: int, h: int = 8, kv: int = 2, d: int = 16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, tq, h, d)), jax.random.normal(ks[1], (b, S, kv, d)),
            jax.random.normal(ks[2], (b, S, kv, d)))


def _select_at(q, k, q_pos):
    fine = pooled_kernels(k, SEL["kernel_size"], SEL["kernel_stride"])
    coarse = pooled_kernels(k, 4 * SEL["kernel_size"], 4 * SEL["kernel_stride"])
    return select_blocks_at(q, fine, coarse, q_pos, kv_len=S, **SEL)


@pytest.mark.parametrize("tq", [1, 4])
def test_rows_at_their_own_positions_equal_the_static_op_per_row(tq):
    """Row b's queries sit at p_b..p_b+tq-1 of a full cache whose later keys are junk: selection
    and attention equal the static-``cache_len`` op on that row's prefix alone."""
    starts = [3, 70, 131]
    q, k, v = _cache(0, len(starts), tq)
    q_pos = jnp.asarray([[p + t for t in range(tq)] for p in starts], jnp.int32)
    idx = _select_at(q, k, q_pos)
    got = sparse_attention_at(q, k, v, idx, q_pos, block_size=SEL["block_size"])
    assert idx.shape == (len(starts), 2, tq, SEL["topk"])
    for b, p in enumerate(starts):
        row = lambda x: x[b:b + 1, :p + tq]
        want_idx = select_blocks(q[b:b + 1], row(k), cache_len=p, **SEL)
        np.testing.assert_array_equal(idx[b:b + 1], want_idx, err_msg=f"row {b}")
        want = sparse_attention_reference(q[b:b + 1], row(k), row(v), want_idx,
                                          block_size=SEL["block_size"], cache_len=p)
        np.testing.assert_allclose(got[b:b + 1], want, atol=1e-5, rtol=1e-5, err_msg=f"row {b}")
    # the last row is really sparse: 5 of its 9 blocks, 2 of them chosen by score
    assert ((np.asarray(idx[2]) >= 0).sum(-1) == 5).all()


def test_padding_rows_select_nothing_and_give_zeros():
    q, k, v = _cache(1, 2, 2)
    q_pos = jnp.asarray([[-1, -1], [40, 41]], jnp.int32)
    idx = _select_at(q, k, q_pos)
    assert (np.asarray(idx[0]) == -1).all() and (np.asarray(idx[1]) >= 0).any()
    out = np.asarray(sparse_attention_at(q, k, v, idx, q_pos, block_size=16))
    assert (out[0] == 0).all() and np.isfinite(out).all() and (out[1] != 0).all()


def test_attention_cost_does_not_grow_with_the_cache():
    """Compiled stage 2 does the same FLOPs (and exps) for a 1K and a 16K cache: only the
    topk*block_size gathered keys are scored; the static dense-masked reference grows."""
    def cost(fn, s):
        q = jax.ShapeDtypeStruct((2, 1, 8, 16), jnp.float32)
        kv = jax.ShapeDtypeStruct((2, s, 2, 16), jnp.float32)
        idx = jax.ShapeDtypeStruct((2, 2, 1, 3), jnp.int32)
        pos = jax.ShapeDtypeStruct((2, 1), jnp.int32)
        c = jax.jit(fn).lower(q, kv, kv, idx, pos).compile().cost_analysis()
        return c["flops"], c["transcendentals"]

    at = lambda q, k, v, i, p: sparse_attention_at(q, k, v, i, p, block_size=16)
    assert cost(at, 1024) == cost(at, 16384)
    ref = lambda q, k, v, i, p: sparse_attention_reference(q, k, v, i, block_size=16,
                                                           cache_len=k.shape[1] - 1)
    assert cost(ref, 16384)[0] > 4 * cost(ref, 1024)[0]


def test_bad_inputs_are_named():
    q, k, v = _cache(2, 2, 3)
    idx = jnp.zeros((2, 2, 3, 5), jnp.int32)
    with pytest.raises(ValueError, match="q_pos must be integer"):
        sparse_attention_at(q, k, v, idx, jnp.zeros((2, 1), jnp.int32), block_size=16)
    with pytest.raises(ValueError, match="q_pos must be integer"):
        sparse_attention_at(q, k, v, idx, jnp.zeros((2, 3)), block_size=16)
    with pytest.raises(ValueError, match="block_idx must be"):
        sparse_attention_at(q, k, v, idx[:, :1], jnp.zeros((2, 3), jnp.int32), block_size=16)
    with pytest.raises(ValueError, match="H=8 is not a multiple of KV=3"):
        select_blocks_at(q, jnp.zeros((2, 3, 5, 16)), None, jnp.zeros((2, 3), jnp.int32),
                         kv_len=S, **SEL)


def test_more_slots_than_blocks_in_any_order():
    """topk 5 over a 2-block cache, valid ids between -1 slots: the gather keeps every valid id
    (the XLA path reads at most n_blocks slots) and equals the oracle."""
    q, k, v = _cache(3, 1, 20)
    k, v = k[:, :20], v[:, :20]
    idx = np.full((1, 2, 20, 5), -1, np.int32)
    idx[..., 3] = 0
    idx[:, :, 10:, 1] = 1
    idx = jnp.asarray(idx)
    q_pos = jnp.arange(20, dtype=jnp.int32)[None]
    got = sparse_attention_at(q, k, v, idx, q_pos, block_size=16)
    want = sparse_attention_reference(q, k, v, idx, block_size=16)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [n for n in ATTENTION.names
                                  if n not in ("pallas_tpu", "pallas_gpu")])
@pytest.mark.parametrize("d", [16, 64])
def test_a_lane_packed_cache_gives_the_heads_layout_result(impl, d):
    """K/V cached as [B, S, KV * D] (`layout`, what the TPU kernel reads in place) attend
    exactly as [B, S, KV, D] in every implementation; the TPU kernel spreads each head's query
    tile over all lanes, with zeros outside its own."""
    starts = [5, 60, 140]
    q, k, v = _cache(4, len(starts), 2, d=d)
    q_pos = jnp.asarray([[p, p + 1] for p in starts], jnp.int32)
    idx = _select_at(q, k, q_pos)
    want = sparse_attention_at(q, k, v, idx, q_pos, block_size=16, implementation=impl)
    flat = lambda x: x.reshape(*x.shape[:2], -1)  # noqa: E731
    got = sparse_attention_at(q, flat(k), flat(v), idx, q_pos, block_size=16,
                              implementation=impl)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(got, sparse_attention_at(q, k, v, idx, q_pos, block_size=16,
                                                        implementation="reference"),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [n for n in ATTENTION.names
                                  if n not in ("pallas_tpu", "pallas_gpu")])
def test_the_log_sum_exp_merges_two_key_sets_into_one_softmax(impl):
    """``return_lse`` in every implementation: the scores' log-sum-exp over the visible keys
    (0 for a padding row), so attention over a prefix and attention over further keys merge
    into the softmax over both, which is how speculation-tree nodes use it."""
    starts = [-1, 60, 140]
    q, k, v = _cache(5, len(starts), 2)
    q_pos = jnp.asarray([[max(p, 0) + t if p >= 0 else -1 for t in range(2)] for p in starts],
                        jnp.int32)
    idx = _select_at(q, k, q_pos)
    out, lse = sparse_attention_at(q, k, v, idx, q_pos, block_size=16, implementation=impl,
                                   return_lse=True)
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, sparse_attention_at(q, k, v, idx, q_pos, block_size=16,
                                                        implementation=impl), atol=1e-6)
    # the same visible keys as a dense mask, scores in f32
    blocks = np.asarray(idx)
    key_block = np.arange(S) // 16
    vis = (key_block[None, None, None, :, None] == blocks[..., None, :]).any(-1)
    vis &= np.arange(S)[None, None, None, :] <= np.asarray(q_pos)[:, None, :, None]
    s = np.einsum("btkgd,bskd->bkgts", np.asarray(q).reshape(3, 2, 2, 4, 16), np.asarray(k))
    s = np.where(vis[:, :, None], s / 4.0, -np.inf)
    want = np.logaddexp.reduce(s, axis=-1).transpose(0, 3, 1, 2).reshape(3, 2, 8)
    np.testing.assert_allclose(lse[1:], want[1:], atol=1e-4, rtol=1e-5)
    assert (np.asarray(lse[0]) == 0).all()
    # merged with one extra key per query head, it is the softmax over both
    ek, ev = jax.random.normal(jax.random.key(6), (2, 3, 2, 8, 16))
    se = (q * ek).sum(-1) / 4.0
    mx = jnp.maximum(lse, se)
    merged = ((out * jnp.exp(lse - mx)[..., None] + ev * jnp.exp(se - mx)[..., None])
              / (jnp.exp(lse - mx) + jnp.exp(se - mx))[..., None])
    p = np.exp(s - np.logaddexp(np.logaddexp.reduce(s, -1), np.asarray(se).reshape(
        3, 2, 2, 4).transpose(0, 2, 3, 1))[..., None])
    direct = np.einsum("bkgts,bskd->btkgd", np.where(vis[:, :, None], p, 0), np.asarray(v))
    direct = direct.reshape(3, 2, 8, 16) + np.asarray(ev) * np.exp(
        np.asarray(se) - np.asarray(jnp.logaddexp(lse, se)))[..., None]
    np.testing.assert_allclose(merged[1:], direct[1:], atol=1e-4, rtol=1e-4)


def test_a_query_reading_its_own_kernel_selects_what_its_cache_would_give():
    """``seen`` and ``own``: a query at p whose cache holds its keys only up to m-1 < p (a
    tree node: its ancestors are elsewhere) selects as from the full cache when it is handed
    the coarse kernel ending in m..p; ``dense_per_query`` decides dense mode per position."""
    q, k, _ = _cache(13, 1, 1)
    m, p = 95, 98  # coarse kernels end at 31, 47, ..., 95: the one ending at 95 holds m..p
    fine = pooled_kernels(k, SEL["kernel_size"], SEL["kernel_stride"])
    coarse = pooled_kernels(k, 4 * SEL["kernel_size"], 4 * SEL["kernel_stride"])
    q_pos = jnp.asarray([[p]], jnp.int32)
    want = select_blocks_at(q, fine, coarse, q_pos, kv_len=S, **SEL)
    j = (95 - 31) // 16
    # kernels from m on hold junk, as after a tree round; read, this junk changes the selection
    stale = coarse.at[:, :, j:].set(3 * jax.random.normal(jax.random.key(113),
                                                          coarse[:, :, j:].shape))
    assert not np.array_equal(select_blocks_at(q, fine, stale, q_pos, kv_len=S, **SEL), want)
    seen = jnp.asarray([[m - 1]], jnp.int32)
    own = (jnp.swapaxes(coarse[:, :, j:j + 1], 1, 2), jnp.asarray([[j]], jnp.int32))
    got = select_blocks_at(q, fine, stale, q_pos, kv_len=S, seen=seen, own=own, **SEL)
    np.testing.assert_array_equal(got, want)
    # per-query dense mode: positions 40 and 41 with dense_len 42 -> dense, then sparse
    two = jnp.asarray([[40, 41]], jnp.int32)
    q2 = jnp.concatenate([q, q], 1)
    rows = select_blocks_at(q2, fine, coarse, two, kv_len=S, dense_len=42, **SEL)
    each = select_blocks_at(q2, fine, coarse, two, kv_len=S, dense_len=42,
                            dense_per_query=True, **SEL)
    assert (np.asarray(rows) >= 0).sum(-1).max() <= SEL["topk"]
    assert ((np.asarray(each[:, :, 0]) >= 0).sum(-1) == 3).all()  # blocks 0..2: all of 40's
    np.testing.assert_array_equal(each[:, :, 1], rows[:, :, 1])
