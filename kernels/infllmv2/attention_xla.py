"""Stage 2 of InfLLM v2 (InfLLM-V2, arXiv 2509.24663 §3, step H of README.md) in plain XLA, gather formulation.

Each query token gathers only its KV group's selected blocks ([topk*block_size] keys), over
query chunks with `lax.map` and per-chunk rematerialisation, so memory is
O(chunk * topk * block_size * D) and FLOPs scale with the selected tokens, not Tk.
Differentiable by ordinary autodiff (the gather's transpose is a scatter-add into dk/dv).
Query positions are an array ``[B or 1, Tq]``, so the same code serves the static layout of
`api.sparse_attention` (``cache_len + t``) and queries at per-row dynamic positions in a
position-addressed KV cache (`api.sparse_attention_at`: decode, speculative verification,
prefill chunks). XLA fuses the `kv_blocks` relayout into the gather, so only the selected
blocks of the cache are read. Packed rows give each query its document's first row position
(``key_offset``): block b is then the window of keys ``key_offset + block_size * b ..``, which
the gather reads at any offset.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kv_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """Keys or values ``[B, Tk, KV, D]`` as ``[B, KV, n_blocks, block_size, D]``, zero-padded to
    whole blocks: the layout both stage-2 paths index by block id."""
    b, tk, kvh, d = x.shape
    n_blocks = -(-tk // block_size)
    x = jnp.pad(x, ((0, 0), (0, n_blocks * block_size - tk), (0, 0), (0, 0)))
    return x.reshape(b, n_blocks, block_size, kvh, d).transpose(0, 3, 1, 2, 4)


def sparse_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array,
                         q_pos: jax.Array, key_offset: jax.Array | None = None, *,
                         block_size: int, softmax_scale: float | None = None,
                         query_chunk: int = 128, return_lse: bool = False
                         ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """q [B, Tq, H, D], k/v [B, Tk, KV, D], block_idx int32 [B, KV, Tq, topk], q_pos int
    [B or 1, Tq] -> [B, Tq, H, D]. Key s is visible iff it lies in a selected block (block b
    spans ``key_offset + block_size * b + [0, block_size)``, ``key_offset [B, Tq]`` default 0)
    and ``s <= q_pos`` (s < Tk); a query with none (e.g. q_pos < 0, padding) gives zeros.
    ``return_lse``: also the log-sum-exp of the scaled scores ``[B, Tq, H]`` (0 for none)."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    n_blocks = -(-tk // block_size)
    if key_offset is None and block_idx.shape[-1] > n_blocks:
        # a row holds at most n_blocks distinct blocks: keep its n_blocks largest entries (every
        # valid id, in any order) so a short cache with a large topk gathers no empty slots
        block_idx = jax.lax.top_k(block_idx, n_blocks)[0]
    g, topk = h // kvh, block_idx.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if key_offset is None:
        kb, vb = kv_blocks(k, block_size), kv_blocks(v, block_size)
    else:  # head-major rows with one spare block, so every window lies inside
        kb, vb = (jnp.pad(x, ((0, 0), (0, block_size), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
                  for x in (k, v))
        key_offset = jnp.broadcast_to(key_offset, (b, tq))
    chunk = min(query_chunk, tq)
    n_chunks = -(-tq // chunk)
    tp = n_chunks * chunk
    qc = jnp.pad(q, ((0, 0), (0, tp - tq), (0, 0), (0, 0)))
    qc = qc.reshape(b, n_chunks, chunk, kvh, g, d).transpose(1, 0, 3, 2, 4, 5)  # [n,B,KV,c,G,D]
    ic = jnp.pad(block_idx, ((0, 0), (0, 0), (0, tp - tq), (0, 0)), constant_values=-1)
    ic = ic.reshape(b, kvh, n_chunks, chunk, topk).transpose(2, 0, 1, 3, 4)  # [n,B,KV,c,topk]
    pos = jnp.pad(q_pos, ((0, 0), (0, tp - tq)), constant_values=-1)
    pos = pos.reshape(pos.shape[0], n_chunks, chunk).transpose(1, 0, 2)  # [n, B or 1, c]
    off = jnp.zeros((1, tp), jnp.int32) if key_offset is None else jnp.pad(
        key_offset, ((0, 0), (0, tp - tq)))
    off = off.reshape(off.shape[0], n_chunks, chunk).transpose(1, 0, 2)  # [n, B or 1, c]

    window = jax.vmap(jax.vmap(lambda x, s0: jax.lax.dynamic_slice_in_dim(
        x, s0, block_size, axis=0), in_axes=(None, 0)), in_axes=(None, 0))

    def gather(x: jax.Array, idx: jax.Array, qoff: jax.Array) -> jax.Array:
        """Over B, KV: the selected blocks ``[c, topk, bs, D]`` of each query."""
        if key_offset is None:  # [nb, bs, D][c, topk]
            return jax.vmap(jax.vmap(lambda xb, i: xb[i]))(x, idx)
        # windows of bs keys at any start: [Tk + bs, D][c, topk]
        return jax.vmap(jax.vmap(lambda xh, i, o: window(xh, i * block_size + o[:, None]),
                                 in_axes=(0, 0, None)))(x, idx, qoff)

    @jax.checkpoint
    def one_chunk(kb: jax.Array, vb: jax.Array, qch: jax.Array, idx: jax.Array,
                  qpos: jax.Array, qoff: jax.Array) -> jax.Array:
        safe = jnp.maximum(idx, 0)
        qoff = jnp.broadcast_to(qoff, (b, chunk))
        n_keys = topk * block_size  # the selected blocks' keys, flat: one reduction axis
        ks = gather(kb, safe, qoff).reshape(b, kvh, chunk, n_keys, d)
        vs = gather(vb, safe, qoff).reshape(b, kvh, chunk, n_keys, d)
        s = jnp.einsum("bkcgd,bkcsd->bkcgs", qch, ks,
                       preferred_element_type=jnp.float32) * scale
        key_pos = (idx[..., None] * block_size + jnp.arange(block_size)
                   + qoff[:, None, :, None, None]).reshape(b, kvh, chunk, n_keys)
        mask = ((jnp.repeat(idx, block_size, axis=-1) >= 0)
                & (key_pos <= qpos[:, None, :, None]) & (key_pos < tk))
        mask = mask[:, :, :, None]  # broadcast over G
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
        den = p.sum(axis=-1, keepdims=True)
        p = p / jnp.where(den > 0, den, 1.0)
        o = jnp.einsum("bkcgs,bkcsd->bkcgd", p.astype(v.dtype), vs,
                       preferred_element_type=jnp.float32)
        lse = jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), 0.0)[..., 0]
        return o.astype(q.dtype), lse  # lse [B, KV, c, G]

    out, lse = jax.lax.map(lambda a: one_chunk(kb, vb, *a), (qc, ic, pos, off))
    out = out.transpose(1, 0, 3, 2, 4, 5).reshape(b, tp, h, d)[:, :tq]  # from [n,B,KV,c,G,D]
    if not return_lse:
        return out
    return out, lse.transpose(1, 0, 3, 2, 4).reshape(b, tp, h)[:, :tq]
