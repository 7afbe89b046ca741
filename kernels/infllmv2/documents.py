"""Packed rows for InfLLM v2: documents as runs of equal segment ids, and their kernels.

A packed training row holds several documents back to back; InfLLM v2 runs on each document as
if it were alone (InfLLM-V2, arXiv 2509.24663 §3, works per sequence: the CUDA kernels take
varlen ``cu_seqlens``). Everything a document's selection uses is therefore indexed *inside the
document*: its kernels start at its first token, its blocks are ``doc_start + block_size * b``
(not aligned to the row's block grid) and its dense/sparse switch looks at its own length.

A document is a maximal run of equal ``segment_ids`` (the data pipeline packs contiguous
documents); no array here is ``[T, T]``: the kernels of all documents of a row form one compact
list of at most ``T // stride`` entries.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Documents(NamedTuple):
    """Per row position (``[B, T]`` int32 each): where its document starts in the row, its
    position inside the document, and the document's length."""

    start: jax.Array
    pos: jax.Array
    length: jax.Array


def documents(segment_ids: jax.Array) -> Documents:
    """Documents of packed rows ``segment_ids [B, T]`` (a new document wherever the id changes)."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    first = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                            axis=1)
    start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)
    later = jnp.concatenate([jnp.where(first[:, 1:], idx[:, 1:], t),
                             jnp.full((b, 1), t, jnp.int32)], axis=1)
    end = jax.lax.cummin(later, axis=1, reverse=True)  # first row position of the next document
    return Documents(start, idx - start, end - start)


class DocumentKernels(NamedTuple):
    """The mean-pooled kernels of every document of a row, as one compact list of N entries in
    row order (a document's kernels are consecutive, kernel j of a document at ``first + j``)."""

    keys: jax.Array  # [B, KV, N, D] float32
    end: jax.Array  # [B, N] position of the kernel's last key inside its document; -1: unused
    doc: jax.Array  # [B, N] row position where the kernel's document starts; -1: unused
    first: jax.Array  # [B, T] compact index of the first kernel of each position's document


def document_kernels(k: jax.Array, docs: Documents, size: int, stride: int) -> DocumentKernels:
    """Kernel j of a document = mean of its keys ``stride*j .. stride*j + size - 1`` (step A),
    full kernels only, for every document of the rows ``k [B, T, KV, D]``.

    Computed as `selection.pooled_kernels` computes them (stride-sized sub-means, then their
    mean), so a document's kernels are bit-identical to those of the document alone.
    """
    if size % stride:
        raise ValueError(f"kernel_size {size} must be a multiple of kernel_stride {stride}")
    b, t, kvh, d = k.shape
    n = t // stride  # sum over documents of (L - size) // stride + 1 <= sum L // stride
    ends_here = (docs.pos >= size - 1) & ((docs.pos - size + 1) % stride == 0)
    count = jnp.cumsum(ends_here, axis=1, dtype=jnp.int32)
    slot = jnp.where(ends_here, count - 1, n)  # n: dropped
    rows = jnp.arange(b)[:, None]
    row_end = jnp.full((b, n), -1, jnp.int32).at[rows, slot].set(
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop")
    used = row_end >= 0
    at = jnp.maximum(row_end, 0)
    end = jnp.where(used, jnp.take_along_axis(docs.pos, at, axis=1), -1)
    doc = jnp.where(used, jnp.take_along_axis(docs.start, at, axis=1), -1)
    first = jnp.take_along_axis(count - ends_here, docs.start, axis=1)  # kernels before the doc
    if n == 0:
        return DocumentKernels(jnp.zeros((b, kvh, 0, d), jnp.float32), end, doc, first)

    def window(row: jax.Array, e: jax.Array) -> jax.Array:  # keys e-size+1 .. e of one row
        return jax.lax.dynamic_slice_in_dim(row, jnp.maximum(e - size + 1, 0), size, axis=0)

    win = jax.vmap(jax.vmap(window, in_axes=(None, 0)))(k, at)
    kern = window_means(win, stride)  # [B, N, KV, D]
    return DocumentKernels(jnp.transpose(kern, (0, 2, 1, 3)), end, doc, first)


def window_means(windows: jax.Array, stride: int) -> jax.Array:
    """Kernels from their key windows ``[..., size, KV, D]`` -> ``[..., KV, D]`` float32: the
    mean of the stride-sized sub-means, the arithmetic of `selection.pooled_kernels`, so every
    path that pools a kernel gets the same bits."""
    size = windows.shape[-3]
    r = size // stride
    sub = windows.astype(jnp.float32).reshape(*windows.shape[:-3], r, stride,
                                              *windows.shape[-2:]).mean(axis=-3)
    return sum(sub[..., i, :, :] for i in range(r)) / r


def kernel_slots(block_idx: jax.Array, key_offset: jax.Array | None, q_pos: jax.Array,
                 block_size: int) -> jax.Array:
    """Selected blocks as the Pallas kernels read them: block-aligned slices of the key rows.

    ``block_idx [B, KV, Tq, S]`` holds each query's selected blocks counted from
    ``key_offset [B, Tq]`` (its document's first row position; None: 0), so a selected block
    covers keys ``key_offset + block_size * b + [0, block_size)``. Unless the document starts on
    the row's block grid, that range straddles two aligned blocks; each slot then becomes two
    entries (the tail of one aligned block, the head of the next, kept only if it starts at or
    before the query's position ``q_pos [B or 1, Tq]``) and Mosaic can DMA whole aligned
    blocks (it cannot DMA at a row offset that is not a multiple of the tile).

    Returns int32 codes ``[B, KV, Tq, S]`` (no offsets) or ``[B, KV, Tq, 2S]``: an entry that
    reads keys ``[lo, hi)`` of aligned block a is ``(a * bs + lo) * bs + hi - 1 >= 0``; an
    unused entry is ``-1 - a`` with a the block the entry before it read, so the kernel's
    pipeline fetches nothing new for it (see `decode_slot`).
    """
    bs = block_size
    if key_offset is None:
        real = block_idx >= 0
        codes = jnp.where(real, block_idx * (bs * bs) + bs - 1, -1)
        aligned = block_idx
    else:
        off = key_offset[:, None, :, None]
        base, r = off // bs + block_idx, off % bs
        head_seen = (base + 1) * bs <= q_pos[:, None, :, None]
        real = jnp.stack([block_idx >= 0, (block_idx >= 0) & (r > 0) & head_seen], axis=-1)
        aligned = jnp.stack([base, base + 1], axis=-1)
        lo = jnp.stack([r, jnp.zeros_like(r)], axis=-1)
        hi = jnp.stack([jnp.full_like(r, bs), r], axis=-1)
        codes = jnp.where(real, (aligned * bs + lo) * bs + hi - 1, -1)
        codes, aligned, real = (x.reshape(*block_idx.shape[:3], -1) for x in (codes, aligned, real))
    last = jax.lax.cummax(jnp.where(real, aligned, 0), axis=real.ndim - 1)
    return jnp.where(real, codes, -1 - last).astype(jnp.int32)


def decode_slot(code: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(aligned block to fetch, first key, one past the last key) of a `kernel_slots` code; an
    unused entry gives its fetch block and the empty range [0, 0)."""
    bs = block_size
    used = code >= 0
    c = jnp.maximum(code, 0)
    blk = jnp.where(used, c // (bs * bs), -1 - code)
    lo = jnp.where(used, (c // bs) % bs, 0)
    hi = jnp.where(used, c % bs + 1, 0)
    return blk, lo, hi


def check_code_range(n_keys: int, block_size: int) -> None:
    """`kernel_slots` codes are int32: refuse rows too long for them."""
    n_blocks = -(-n_keys // block_size) + 1
    if n_blocks * block_size * block_size >= 2 ** 31:
        raise ValueError(f"{n_keys} keys with block_size {block_size} overflow the int32 block "
                         f"codes of the Pallas kernels (at most {2 ** 31 // block_size} keys)")
