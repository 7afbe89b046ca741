"""Learning-rate schedules as pure functions of the step (resuming continues the same curve).

WSD (warmup-stable-decay, MiniCPM; Hu et al. 2024): linear warmup to the peak, constant, then a
decay over the last ``decay_fraction`` of training to ``final_ratio`` x peak. The decay shape is not
given for MiniCPM4 (MiniCPM, arXiv 2404.06395, uses exponential), so it is a choice: exponential (MiniCPM-1), linear, cosine,
or 1-sqrt.
"""

from __future__ import annotations

from typing import Callable, Literal

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]
DecayShape = Literal["exponential", "linear", "cosine", "1-sqrt"]


def _warmup(step: jnp.ndarray, warmup: int) -> jnp.ndarray:
    return jnp.minimum(1.0, (step + 1) / max(warmup, 1))


def _cosine_decay(frac: jnp.ndarray, final_ratio: float) -> jnp.ndarray:
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac))


def wsd(peak: float, total_steps: int, warmup_steps: int, decay_fraction: float = 0.1,
        decay_shape: DecayShape = "exponential", final_ratio: float = 0.1) -> Schedule:
    if not 0 <= decay_fraction <= 1:
        raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
    if not 0 < final_ratio <= 1:
        raise ValueError(f"final_ratio must be in (0, 1], got {final_ratio}")
    decay_steps = int(round(total_steps * decay_fraction))
    decay_start = total_steps - decay_steps

    def shape(frac: jnp.ndarray) -> jnp.ndarray:  # 1 at frac=0 -> final_ratio at frac=1
        if decay_shape == "exponential":
            return final_ratio ** frac
        if decay_shape == "linear":
            return 1 - (1 - final_ratio) * frac
        if decay_shape == "cosine":
            return _cosine_decay(frac, final_ratio)
        if decay_shape == "1-sqrt":
            return 1 - (1 - final_ratio) * jnp.sqrt(frac)
        raise ValueError(f"unknown decay shape {decay_shape!r}")

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
        return peak * _warmup(step, warmup_steps) * jnp.where(step < decay_start, 1.0, shape(frac))

    return schedule


def cosine(peak: float, total_steps: int, warmup_steps: int, final_ratio: float = 0.1) -> Schedule:
    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        return peak * _warmup(step, warmup_steps) * _cosine_decay(frac, final_ratio)

    return schedule
