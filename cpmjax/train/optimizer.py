"""muP parameter groups and the AdamW optimizer.

The MiniCPM4 report gives no per-parameter muP rules (it says only that muP is used); these
follow MiniCPM-1 (Hu et al. 2024, arXiv:2404.06395, "Model Wind Tunnel" / muP appendix) and the
Adam table of Tensor Programs V (Yang et al. 2022, arXiv:2203.03466, Table 3). With width
multiplier m = hidden_size / dim_model_base:

- "hidden" matrices (attention and MLP weights, fan-in grows with width): learning rate lr/m,
  init std initializer_range/sqrt(m) (``cpmjax.model.params.init_std``);
- "embed" (input embedding; its output is scaled by scale_emb in the forward pass) and "ones"
  (RMSNorm gains): the base learning rate;
- "output" (untied lm_head): the base rate; its muP scaling is the 1/m logit multiplier in the
  forward pass (TP-V's output-multiplier form), with init std initializer_range/sqrt(m).

Under the standard parametrization every group uses the base rate. Weight decay (decoupled,
multiplied by the scheduled learning rate and the group multiplier, as AdamW) applies to the
matrices; never to norm gains; to the embedding only if ``decay_embeddings``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cpmjax.config import ModelConfig
from cpmjax.model.params import ParamSpec, param_specs
from cpmjax.model.mtp import mtp_param_specs
from cpmjax.train import schedules


def param_groups(cfg: ModelConfig) -> Any:
    """Tree of group labels ("embed", "hidden", "output", "ones") matching the params."""
    return jax.tree.map(lambda s: s.init, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def mtp_param_groups(cfg: ModelConfig) -> Any:
    """Group labels of the MTP head from its own table (its layer and fc are hidden matrices)."""
    return jax.tree.map(lambda s: s.init, mtp_param_specs(cfg),
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def trainable_groups(cfg: ModelConfig, with_mtp: bool = False) -> Any:
    """Labels of the tree the optimizer sees: the params, or {"model", "mtp"} with an MTP head."""
    groups = param_groups(cfg)
    return {"model": groups, "mtp": mtp_param_groups(cfg)} if with_mtp else groups


def lr_multipliers(cfg: ModelConfig, parametrization: str, groups: Any = None) -> Any:
    """Per-leaf learning-rate factor: 1/m for hidden matrices under muP, else 1."""
    m = cfg.width_multiplier if parametrization == "mup" else 1.0
    groups = param_groups(cfg) if groups is None else groups
    return jax.tree.map(lambda g: 1.0 / m if g == "hidden" else 1.0, groups)


def weight_decay_mask(cfg: ModelConfig, decay_embeddings: bool = False,
                      groups: Any = None) -> Any:
    groups = param_groups(cfg) if groups is None else groups
    return jax.tree.map(lambda g: g in ("hidden", "output") or (g == "embed" and decay_embeddings),
                        groups)


class ScaleByTreeState(NamedTuple):
    pass


def scale_by_tree(factors: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by its own constant factor (per-group learning rates)."""

    def init(params: Any) -> ScaleByTreeState:
        del params
        return ScaleByTreeState()

    def update(updates: Any, state: ScaleByTreeState, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(init, update)


def make_schedule(train: Any) -> schedules.Schedule:
    if train.schedule == "wsd":
        return schedules.wsd(train.lr, train.steps, train.warmup_steps, train.decay_fraction,
                             train.decay_shape, train.final_lr_ratio)
    if train.schedule == "cosine":
        return schedules.cosine(train.lr, train.steps, train.warmup_steps, train.final_lr_ratio)
    if train.schedule == "constant":
        return lambda step: jnp.asarray(train.lr, jnp.float32) * jnp.minimum(
            1.0, (jnp.asarray(step, jnp.float32) + 1) / max(train.warmup_steps, 1))
    raise ValueError(f"config field 'train.schedule': unknown schedule {train.schedule!r} "
                     "(expected wsd, cosine or constant)")


def make_optimizer(train: Any, cfg: ModelConfig) -> optax.GradientTransformation:
    """clip -> Adam moments -> decoupled weight decay -> schedule x per-group muP multiplier, for
    the params, or for {"model": params, "mtp": mtp_params} when ``train.mtp_weight > 0``."""
    schedule = make_schedule(train)
    groups = trainable_groups(cfg, train.get("mtp_weight", 0.0) > 0)
    return optax.chain(
        optax.clip_by_global_norm(train.clip_norm) if train.clip_norm else optax.identity(),
        optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps),
        optax.add_decayed_weights(train.weight_decay,
                                  mask=weight_decay_mask(cfg, train.decay_embeddings, groups)),
        optax.scale_by_schedule(lambda step: -schedule(step)),
        scale_by_tree(lr_multipliers(cfg, train.parametrization, groups)),
    )
