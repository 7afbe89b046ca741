"""Small building blocks of the MiniCPM decoder: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF ``rms_layernorm``: variance in float32, normalise, cast back, then times the gain.

    The gain has no (1 + w) offset (HF modeling_minicpm.py rms_layernorm).
    """
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = (x.astype(jnp.float32) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return normed * weight.astype(x.dtype)


def swiglu_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
               taps: dict[str, jax.Array] | None = None,
               act_transform: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """``down(silu(gate(x)) * up(x))`` with no biases; ``taps["down_in"]`` gets down's input;
    ``act_transform`` maps each matmul's input (quantized activations)."""
    dt = x.dtype
    act = act_transform or (lambda a: a)
    xa = act(x)
    gate = jax.nn.silu(xa @ w_gate.astype(dt))
    inner = gate * (xa @ w_up.astype(dt))
    if taps is not None:
        taps["down_in"] = inner
    return act(inner) @ w_down.astype(dt)
