"""Pure-jnp oracle for InfLLM v2 (InfLLM-V2, arXiv 2509.24663 §3 and HF modeling_minicpm.py; steps A-H as named in README.md).

Written for clarity, not speed: explicit per-kernel and per-block loops and token-level
[Tq, Tk] masks. Use only at small T (tests); production paths are `selection.py` (stage 1)
and `attention_xla.py` / the Pallas kernels (stage 2).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _pooled_kernels(k: jax.Array, size: int, stride: int) -> jax.Array:
    """Step A/B: mean of every full window k[stride*j : stride*j+size]; [B, KV, n, D] f32."""
    tk = k.shape[1]
    n = (tk - size) // stride + 1 if tk >= size else 0
    kf = k.astype(jnp.float32)
    windows = [kf[:, stride * j: stride * j + size].mean(axis=1) for j in range(n)]
    if not windows:
        return jnp.zeros((k.shape[0], k.shape[2], 0, k.shape[3]), jnp.float32)
    return jnp.stack(windows, axis=2)  # [B, KV, n, D]


def select_blocks_reference(q: jax.Array, k: jax.Array, *, kernel_size: int, kernel_stride: int,
                            block_size: int, topk: int, init_blocks: int, local_blocks: int,
                            lse_approx: bool = True, cache_len: int = 0) -> jax.Array:
    """Stage 1 (steps A-G), unchunked. Returns int32 [B, KV, Tq, topk], rows ascending, -1 padded."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    decode = tq == 1 and cache_len > 0
    qpos = cache_len + jnp.arange(tq)  # absolute query positions
    qf = q.astype(jnp.float32).reshape(b, tq, kvh, g, d)
    scale = 1.0 / math.sqrt(d)

    def probs(size: int, stride: int) -> tuple[jax.Array, jax.Array]:
        kc = _pooled_kernels(k, size, stride)
        s = jnp.einsum("btkgd,bknd->bkgtn", qf, kc) * scale
        ends = stride * jnp.arange(kc.shape[2]) + size - 1
        vis = jnp.ones((tq, kc.shape[2]), bool) if decode else ends[None, :] <= qpos[:, None]
        return s, vis

    s1, vis1 = probs(kernel_size, kernel_stride)
    if lse_approx:
        s2, vis2 = probs(4 * kernel_size, 4 * kernel_stride)
    else:
        s2, vis2 = s1, vis1
    lse = jax.nn.logsumexp(jnp.where(vis2, s2, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(vis1, jnp.exp(s1 - lse), 0.0)
    p = jnp.where(jnp.isfinite(p), p, 0.0)  # rows without visible kernels
    shared = p.sum(axis=2)  # [B, KV, Tq, n1]: step E, sum over the G heads

    n1 = shared.shape[-1]
    n_blocks = -(-tk // block_size)
    cols = []
    for blk in range(n_blocks):  # step F: max over the fine kernels intersecting block blk
        lo, hi = blk * block_size, blk * block_size + block_size - 1
        js = [j for j in range(n1)
              if kernel_stride * j <= hi and kernel_stride * j + kernel_size - 1 >= lo]
        cols.append(shared[..., js].max(axis=-1) if js else jnp.full(shared.shape[:-1], -jnp.inf))
    score = jnp.stack(cols, axis=-1)  # [B, KV, Tq, n_blocks]
    blocks = jnp.arange(n_blocks)
    qblock = (qpos // block_size)[:, None]
    forced = (blocks[None, :] < init_blocks) | (
        (blocks[None, :] >= qblock - local_blocks) & (blocks[None, :] <= qblock))
    score = jnp.where(forced, jnp.inf, score)
    kk = min(topk, n_blocks)
    _, idx = jax.lax.top_k(score, kk)  # step G
    idx = jnp.where(idx > qblock, -1, idx)
    idx = jnp.sort(jnp.where(idx < 0, n_blocks, idx), axis=-1)
    idx = jnp.where(idx == n_blocks, -1, idx).astype(jnp.int32)
    pad = jnp.full(idx.shape[:-1] + (topk - kk,), -1, jnp.int32)
    return jax.lax.stop_gradient(jnp.concatenate([idx, pad], axis=-1))


def sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array, *,
                               block_size: int, cache_len: int = 0,
                               softmax_scale: float | None = None, q_pos: jax.Array | None = None,
                               key_offset: jax.Array | None = None, return_lse: bool = False
                               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Step H with a dense token-level mask: key s visible to query t iff it lies in a block of
    block_idx[b, kv, t] (block j spans ``key_offset + block_size * j ..``, key_offset [B, Tq]
    default 0) and s <= q_pos (default ``cache_len + t``). Rows with no visible key give zeros.
    f32 math. ``return_lse``: also the scores' log-sum-exp ``[B, Tq, H]`` (0 for none)."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q_pos = (cache_len + jnp.arange(tq))[None] if q_pos is None else q_pos
    off = jnp.zeros((1, tq), jnp.int32) if key_offset is None else key_offset
    n_blocks = -(-tk // block_size) + 1
    one_hot = jax.nn.one_hot(jnp.where(block_idx < 0, n_blocks, block_idx), n_blocks + 1,
                             dtype=bool).any(axis=-2)[..., :n_blocks]  # [B, KV, Tq, n_blocks]
    rel = jnp.arange(tk)[None, None, :] - off[:, :, None]  # [B or 1, Tq, Tk]
    key_block = jnp.where(rel >= 0, rel // block_size, n_blocks - 1)
    key_block = jnp.broadcast_to(key_block, (b, tq, tk))
    mask = jnp.take_along_axis(one_hot, key_block[:, None], axis=-1)  # [B, KV, Tq, Tk]
    mask &= (rel >= 0)[:, None] & (jnp.arange(tk)[None, None, :] <= q_pos[:, :, None])[:, None]
    qf = q.astype(jnp.float32).reshape(b, tq, kvh, g, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) * scale
    s = jnp.where(mask[:, :, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask[:, :, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = p.sum(-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    o = o.reshape(b, tq, h, d).astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), 0.0)  # [B, KV, G, Tq, 1]
    return o, lse[..., 0].transpose(0, 3, 1, 2).reshape(b, tq, h)
