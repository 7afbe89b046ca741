"""Packed rows: a row of several documents selects and attends, per document, exactly what each
document alone does (selection, forward and gradients), for every stage-2 implementation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.infllmv2 import ATTENTION, select_blocks, sparse_attention
from kernels.infllmv2.documents import decode_slot, documents, kernel_slots
from kernels.infllmv2.reference import sparse_attention_reference

SEL = dict(kernel_size=8, kernel_stride=4, block_size=16, topk=3, init_blocks=1, local_blocks=1)
# a 1-token document, one shorter than a kernel, none aligned to the row's 16-token blocks
LENS = (37, 1, 5, 90, 27)
IMPLS = [n for n in ATTENTION.names if n not in ("pallas_tpu", "pallas_gpu")]


def _row(seed: int, h: int = 8, kv: int = 2, d: int = 16):
    t = sum(LENS)
    ks = jax.random.split(jax.random.key(seed), 4)
    q, w = (jax.random.normal(x, (1, t, h, d)) for x in ks[::3])
    k, v = (jax.random.normal(x, (1, t, kv, d)) for x in ks[1:3])
    seg = jnp.asarray(np.repeat(np.arange(len(LENS)), LENS))[None]
    return q, k, v, w, seg


def _docs(*xs):
    """Each document's slice of every ``[1, T, ...]`` array."""
    at = np.cumsum((0,) + LENS)
    return [[x[:, a:b] for x in xs] for a, b in zip(at[:-1], at[1:])]


def test_documents_are_runs_of_equal_ids():
    d = documents(jnp.asarray([[3, 3, 3, 7, 1, 1, 3, 3]]))
    assert d.start.tolist() == [[0, 0, 0, 3, 4, 4, 6, 6]]
    assert d.pos.tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]
    assert d.length.tolist() == [[3, 3, 3, 1, 2, 2, 2, 2]]


def test_packed_selection_equals_each_document_alone():
    q, k, _, _, seg = _row(0)
    got = select_blocks(q, k, segment_ids=seg, query_chunk=32, **SEL)
    at = 0
    for qd, kd in _docs(q, k):
        want = select_blocks(qd, kd, **SEL)
        np.testing.assert_array_equal(got[:, :, at:at + qd.shape[1]], want, err_msg=f"at {at}")
        at += qd.shape[1]
    # the 90-token document is really sparse: 3 of its up to 6 blocks
    assert ((np.asarray(got[0, :, 43 + 80:133]) >= 0).sum(-1) == 3).all()


@pytest.fixture(scope="module")
def packed_case():
    """A packed row, its selection, and the loss and gradients of each document run alone
    through the reference (the oracle, computed once)."""
    q, k, v, w, seg = _row(1)

    @jax.jit
    def alone(q, k, v):
        outs = []
        for qd, kd, vd in _docs(q, k, v):
            i = select_blocks(qd, kd, **SEL)
            outs.append(sparse_attention_reference(qd, kd, vd, i, block_size=16))
        return (jnp.concatenate(outs, axis=1) * w).sum()

    want = jax.jit(jax.value_and_grad(alone, (0, 1, 2)))(q, k, v)
    return (q, k, v, w, seg), select_blocks(q, k, segment_ids=seg, **SEL), want


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_attention_equals_each_document_alone(impl, packed_case):
    """Forward and dq/dk/dv against the reference run on each document alone."""
    (q, k, v, w, seg), idx, (want, g_want) = packed_case

    def packed(q, k, v):
        return (sparse_attention(q, k, v, idx, block_size=16, segment_ids=seg,
                                 implementation=impl) * w).sum()

    got, g_got = jax.jit(jax.value_and_grad(packed, (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, a, b in zip("qkv", g_got, g_want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_dense_len_keeps_every_block_of_short_documents():
    """dense_len 40: documents shorter than 40 attend densely (equal to causal attention on the
    document alone); the 90-token one selects as with no dense_len."""
    q, k, v, _, seg = _row(2)
    idx = select_blocks(q, k, segment_ids=seg, dense_len=40, **SEL)
    assert idx.shape[-1] == 3  # ceil(39 / 16) slots cover the longest dense document
    plain = select_blocks(q, k, segment_ids=seg, **SEL)
    out = sparse_attention(q, k, v, idx, block_size=16, segment_ids=seg, implementation="xla")
    at = 0
    for n, (qd, kd, vd) in zip(LENS, _docs(q, k, v)):
        if n < 40:
            np.testing.assert_allclose(out[:, at:at + n], jax.nn.dot_product_attention(
                qd, kd, vd, is_causal=True), atol=2e-5, rtol=2e-5)
        else:
            np.testing.assert_array_equal(idx[:, :, at:at + n], plain[:, :, at:at + n])
        at += n
    # with dense_len above topk * block_size, dense rows need more slots than topk
    wide = select_blocks(q, k, segment_ids=seg, dense_len=100, **SEL)
    assert wide.shape[-1] == 7 and (np.asarray(wide[0, :, 43 + 89]) >= 0).sum(-1).tolist() == [6, 6]


def test_slots_split_unaligned_blocks_into_aligned_ranges():
    """A document starting at row position 21 (block 1, offset 5): its block 0 is keys 21..36,
    i.e. keys 5..15 of aligned block 1 and 0..4 of block 2; the second half is dropped for a
    query at position 31 (it has not reached key 32), and unused slots name the block before."""
    bs = 16
    idx = jnp.asarray([[[[0, -1], [0, 1]]]], jnp.int32)  # [B=1, KV=1, Tq=2, S=2]
    codes = kernel_slots(idx, jnp.asarray([[21, 21]]), jnp.asarray([[31, 60]]), bs)
    slots = [[tuple(int(x) for x in decode_slot(c, bs)) if c >= 0 else ("skip", -1 - int(c))
              for c in row] for row in codes[0, 0]]
    assert slots[0] == [(1, 5, 16), ("skip", 1), ("skip", 1), ("skip", 1)]
    assert slots[1] == [(1, 5, 16), (2, 0, 5), (2, 5, 16), (3, 0, 5)]
    aligned = kernel_slots(idx, None, jnp.asarray([[31, 60]]), bs)
    assert [tuple(int(x) for x in decode_slot(c, bs)) for c in aligned[0, 0, 1]] == [
        (0, 0, 16), (1, 0, 16)]
