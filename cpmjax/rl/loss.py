"""The policy-gradient objective: GRPO (arXiv 2402.03300) with DAPO's clip-higher and token-level
averaging (arXiv 2503.14476), dual-clip PPO (Ye et al. 2020, arXiv 1912.09729) and a KL term to a
reference model (MiniCPM4 report, arXiv 2506.07900 §3.2), as the gradient function of the
training system's update step (``cpmjax.train.step.make_update_step``).

Per response token t of trajectory i, with the ratio ``r = pi_theta(o_t) / pi_b(o_t)`` against
the behaviour policy b that sampled the token (under chunk-wise rollout the policy version of
the token's chunk: MiniCPM4's chunk-level importance sampling) and the trajectory's advantage A:

    l_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))   PPO clip; eps_high > eps_low
    l_t = min(l_t, -c A)  where A < 0                         dual-clip, c > 1
    J   = sum_t w_t (l_t + beta KL_t),  KL_t = exp(q - p) - (q - p) - 1

with p, q the token's log-probabilities under pi_theta and the reference model (the k3 estimator
of GRPO, arXiv 2402.03300 eq. 4). The weights w_t carry the aggregation and are built on the host
(:func:`token_weights`): DAPO's token-level mean ``1 / sum_i |o_i|`` or GRPO's per-sequence mean
``1 / (n |o_i|)``. Log-probabilities are of the sampling distribution, ``softmax(logits / T)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpmjax.config import ModelConfig
from cpmjax.model import forward
from cpmjax.train.step import accumulate_grads, make_update_step

AGGREGATIONS = ("token", "sequence")
# summed over microbatches, then divided by the token count (all but "objective")
_AUX = ("objective", "pg_loss", "kl", "entropy", "clip_frac", "dual_clip_frac", "ratio",
        "abs_log_ratio", "tokens")


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """Settings of the per-token objective (defaults: DAPO's eps 0.2 / 0.28, dual-clip c = 3 as
    Ye et al. 2020 use, MiniCPM4's KL coefficient 0.001)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = 3.0  # None: no dual-clip
    kl_coef: float = 0.001  # 0: no KL term (and no reference model)
    temperature: float = 1.0


def clipped_token_loss(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, eps_low: float,
                       eps_high: float, dual_clip: float | None
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(loss, clipped, dual-clipped, ratio) per token, elementwise over equal shapes.

    ``clipped`` marks tokens whose gradient the PPO clip removed; ``dual-clipped`` those whose
    loss the dual-clip bound replaced (only where A < 0)."""
    ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    dual = jnp.zeros_like(was_clipped)
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual = (adv < 0) & (loss > bound)
        loss = jnp.where(dual, bound, loss)
    return loss, was_clipped, dual, ratio


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled tokens (>= 0, unbiased)."""
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.exp(d) - d - 1.0


def token_weights(loss_mask: np.ndarray, aggregation: str) -> np.ndarray:
    """float32 ``[B, T]`` weights w_t of the tokens in one update's batch (see module doc); rows
    without a loss token get none."""
    mask = np.asarray(loss_mask, np.float32)
    lengths = mask.sum(axis=1, keepdims=True)
    if aggregation == "token":
        return mask / max(float(mask.sum()), 1.0)
    if aggregation == "sequence":
        rows = max(int((lengths > 0).sum()), 1)
        return mask / np.maximum(lengths, 1.0) / rows
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def target_logprobs(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array],
                    temperature: float, dtype: Any = jnp.float32, remat: str = "none"
                    ) -> tuple[jax.Array, jax.Array]:
    """(log-probability of each target token, entropy of the distribution) ``[B, T]`` under
    ``softmax(logits / temperature)``."""
    out = forward(params, cfg, batch["inputs"], positions=batch["positions"],
                  segment_ids=batch["segment_ids"], dtype=dtype, remat=remat)
    logp_all = jax.nn.log_softmax(out.logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, jax.lax.stop_gradient(entropy)


def make_rl_grad_fn(cfg: ModelConfig, loss: PolicyLoss, *, grad_accum: int = 1,
                    dtype: Any = jnp.float32, remat: str = "none") -> Callable[..., Any]:
    """``grads(params, batch) -> (grads, metrics)`` of J over the batch, whose ``[B, T]`` leaves
    are the model inputs plus ``loss_mask``, ``weights``, ``old_logprobs``, ``advantages`` and,
    when ``loss.kl_coef > 0``, ``ref_logprobs``."""

    def objective(params: Any, micro: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logp, entropy = target_logprobs(params, cfg, micro, loss.temperature, dtype, remat)
        pg, clipped, dual, ratio = clipped_token_loss(
            logp, micro["old_logprobs"], micro["advantages"], loss.eps_low, loss.eps_high,
            loss.dual_clip)
        kl = k3_kl(logp, micro["ref_logprobs"]) if loss.kl_coef > 0 else jnp.zeros_like(logp)
        w, mask = micro["weights"], micro["loss_mask"]
        value = jnp.sum(w * (pg + loss.kl_coef * kl))
        masked = lambda x: jnp.sum(mask * x)
        aux = jnp.stack([value, jnp.sum(w * pg), masked(kl), masked(entropy), masked(clipped),
                         masked(dual), masked(ratio),
                         masked(jnp.abs(logp - micro["old_logprobs"])), jnp.sum(mask)])
        return value, aux

    def grad_fn(params: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        value_and_grad = jax.value_and_grad(objective, has_aux=True)
        grads, sums = accumulate_grads(value_and_grad, params, batch, grad_accum,
                                       jnp.zeros((len(_AUX),)))
        tokens = jnp.maximum(sums[-1], 1.0)
        metrics = {name: sums[i] if name in ("objective", "pg_loss", "tokens")
                   else sums[i] / tokens for i, name in enumerate(_AUX)}
        return grads, {"loss": metrics.pop("objective"), **metrics}

    return grad_fn


def make_rl_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, loss: PolicyLoss, *,
                       grad_accum: int = 1, dtype: Any = jnp.float32, remat: str = "none"
                       ) -> Callable[..., Any]:
    """The training system's update step with the RL objective: ``step(state, batch)``."""
    return make_update_step(tx, make_rl_grad_fn(cfg, loss, grad_accum=grad_accum, dtype=dtype,
                                                remat=remat))
