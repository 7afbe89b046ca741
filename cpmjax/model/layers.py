"""Small building blocks of the MiniCPM decoder: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def linear(x: jax.Array, w: Any, n_in: int = 1, preferred_element_type: Any = None
           ) -> jax.Array:
    """``x [..., *in] @ w [*in, *out] -> [..., *out]`` as one 2-D matmul.

    Same result as the einsum; written as a 2-D dot because XLA's CPU backend ran dots with
    leading batch-like operand dims, and above all their gradients, about 2x slower (the
    backward's elementwise fusions wrote transposed layouts; measured on the tiny model's MLP:
    gradient 23.8 vs 12.5 ms). Accelerators compile both forms alike.

    ``w`` may also be a packed weight (``cpmjax.quant.qlinear.QuantizedWeight``; told apart as
    "not an array" since ``cpmjax.quant`` imports this module): its ``matmul`` then reads the
    packed codes and dequantizes inside the matmul, not a whole dense layer before it.
    """
    lead, ins, outs = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:], w.shape[n_in:]
    k = math.prod(ins)
    x2 = x.reshape(-1, k)
    if isinstance(w, (jax.Array, np.ndarray)):
        y = jnp.dot(x2, w.reshape(k, -1), preferred_element_type=preferred_element_type)
    else:
        y = w.matmul(x2, preferred_element_type)
    return y.reshape(*lead, *outs)


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
    gate = jax.nn.silu(linear(xa, w_gate.astype(dt)))
    inner = gate * linear(xa, w_up.astype(dt))
    if taps is not None:
        taps["down_in"] = inner
    return linear(act(inner), w_down.astype(dt))
