"""The one visibility rule every dense attention implementation computes.

- ``keys_are_queries`` (training, a whole-prompt forward: the keys are the queries' own tokens,
  in order): query i sees key j iff ``j <= i`` and both carry the same segment id. This is the
  causal-plus-documents mask of packed rows that flash kernels (splash, cuDNN) take natively;
  for rows whose positions count up inside each document it equals the position rule below.
- otherwise (keys in a position-addressed KV cache: decode, prefill chunks, verification):
  query i sees key j iff ``0 <= kv_pos[j] <= q_pos[i]`` (and the same segment, when given).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None,
            kv_seg: jax.Array | None, keys_are_queries: bool) -> jax.Array:
    """Boolean ``[B, Tq, Tk]``."""
    if keys_are_queries:
        tq, tk = q_pos.shape[1], kv_pos.shape[1]
        mask = jnp.arange(tk)[None, None, :] <= jnp.arange(tq)[None, :, None]
        mask = jnp.broadcast_to(mask, (q_pos.shape[0], tq, tk))
    else:
        mask = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (kv_pos[:, None, :] >= 0)
    if q_seg is not None and kv_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    return mask
