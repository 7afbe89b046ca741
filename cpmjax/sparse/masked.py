"""Block selection on document-relative positions, for packed rows the fast ops cannot take.

``kernels/infllmv2`` selects for one sequence per row (positions ``0..T-1`` with a static
``cache_len``, or per-row positions in a position-addressed cache). Packed rows (several
documents, positions restarting at 0) are not of that form. Here every kernel and block is
indexed by its position *inside its document*, so a packed row selects, per document, exactly
what the document alone would select (InfLLM-V2 steps A-G, the op's own
`select_from_pooled`), and stage 2 becomes a token mask for dense attention: exact, but with
dense cost (it saves no FLOPs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cpmjax.config import SparseConfig
from kernels.infllmv2.selection import select_from_pooled

_FAR = 2 ** 30  # end position of a kernel that does not exist: never visible


def window_kernels(k: jax.Array, kv_pos: jax.Array, kv_seg: jax.Array | None, size: int,
                   stride: int) -> tuple[jax.Array, jax.Array]:
    """Mean of the ``size`` keys ending at every row position, and the kernel's end position.

    Returns kernels ``[B, KV, Tk, D]`` f32 and ends ``[B, Tk]``: the document-relative position
    of the kernel's last key, or ``_FAR`` where no kernel of the document ends there (kernel j
    of a document spans positions ``stride*j .. stride*j+size-1``, step A of kernels/infllmv2/README.md).
    """
    b, tk = kv_pos.shape
    sums = jax.lax.reduce_window(k.astype(jnp.float32), 0.0, jax.lax.add, (1, size, 1, 1),
                                 (1, 1, 1, 1), ((0, 0), (size - 1, 0), (0, 0), (0, 0)))
    start = jnp.pad(kv_pos, ((0, 0), (size - 1, 0)), constant_values=-1)[:, :tk]
    ok = (kv_pos >= size - 1) & ((kv_pos - size + 1) % stride == 0) & (start == kv_pos - size + 1)
    if kv_seg is not None:
        ok &= jnp.pad(kv_seg, ((0, 0), (size - 1, 0)), constant_values=-1)[:, :tk] == kv_seg
    return jnp.transpose(sums / size, (0, 2, 1, 3)), jnp.where(ok, kv_pos, _FAR)


def _block_scores(p: jax.Array, ends: jax.Array, size: int, block_size: int,
                  n_blocks: int) -> jax.Array:
    """Step F: per block, max of the group-summed scores of the kernels intersecting it.

    ``p [B, KV, Tq, N]``, ``ends [B, N]``; blocks without an existing kernel score -inf, as in
    the reference (kernels that exist but are not yet visible score 0).
    """
    starts = ends - size + 1
    width = (size - 1) // block_size + 2

    def one_row(p_row: jax.Array, s_row: jax.Array, e_row: jax.Array) -> jax.Array:
        out = jnp.full(p_row.shape[:-1] + (n_blocks,), -jnp.inf, p_row.dtype)
        for o in range(width):
            blk = s_row // block_size + o
            hit = (blk <= e_row // block_size) & (e_row < _FAR)
            out = out.at[..., jnp.where(hit, blk, n_blocks)].max(p_row, mode="drop")
        return out

    return jax.vmap(one_row)(p, starts, ends)


Kernels = tuple[jax.Array, jax.Array, jax.Array | None]  # (kernels [B,KV,N,D], ends [B,N], docs [B,N])


def select_masked(q: jax.Array, q_pos: jax.Array, q_seg: jax.Array | None, fine: Kernels,
                  coarse: Kernels, sc: SparseConfig, n_blocks: int) -> jax.Array:
    """Steps C-G with document-relative positions -> selected-block mask ``[B, KV, Tq, n_blocks]``.

    ``fine`` (kernel_size/stride) and ``coarse`` (4x, for the LSE approximation) kernels come
    with their end positions and, for packed rows, their document ids. Visibility is
    ``end <= q_pos`` within q's document; in decode this equals HF's non-causal stage 1, since
    every complete kernel ends at or before the query. The steps themselves are the op's
    (`select_from_pooled`); only visibility and the block max-pool are document-relative here.
    """
    b, tq, h, d = q.shape
    kvh = fine[0].shape[1]
    qg = q.reshape(b, tq, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, Tq, D]

    def mine(docs: jax.Array | None, n: int) -> jax.Array:
        return (jnp.ones((b, tq, n), bool) if docs is None
                else q_seg[:, :, None] == docs[:, None, :])

    def pooled(kern: Kernels) -> tuple[jax.Array, jax.Array]:
        kc, ends, docs = kern
        vis = mine(docs, ends.shape[1]) & (ends[:, None, :] <= q_pos[:, :, None])
        return kc, vis[:, None, None]

    mine1 = mine(fine[2], fine[1].shape[1])[:, None]

    def block_max(shared: jax.Array) -> jax.Array:
        # other documents' kernels do not exist for this query
        return _block_scores(jnp.where(mine1, shared, -jnp.inf), fine[1], sc.kernel_size,
                             sc.block_size, n_blocks)

    idx = select_from_pooled(qg, pooled(fine), pooled(coarse), q_pos, block_max,
                             n_blocks=n_blocks, block_size=sc.block_size, topk=sc.total_topk,
                             init_blocks=sc.init_blocks, local_blocks=sc.local_blocks)
    return jax.nn.one_hot(jnp.where(idx < 0, n_blocks, idx), n_blocks + 1,
                          dtype=bool).any(axis=-2)[..., :n_blocks]


def token_mask(chosen: jax.Array, base: jax.Array, kv_pos: jax.Array,
               block_size: int) -> jax.Array:
    """Stage 2 as a mask ``[B, KV, Tq, Tk]``: key visible iff its document block is selected
    and the ordinary causal/document mask ``base [B, Tq, Tk]`` allows it."""
    blk = jnp.clip(kv_pos // block_size, 0, chosen.shape[-1] - 1)
    picked = jax.vmap(lambda c, bl: c[..., bl])(chosen, blk)
    return picked & base[:, None]
