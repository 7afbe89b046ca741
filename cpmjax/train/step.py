"""The train state and the jitted, sharded train / eval steps.

The state is a plain pytree ``{"step", "params", "opt_state", "nonfinite_steps"}`` plus
``"mtp_params"`` (the multi-token-prediction head, kept under its own key so it exports separately)
when ``mtp_weight > 0``; the optimizer then sees ``{"model": params, "mtp": mtp_params}``. Master
weights are float32; the forward pass casts them to the compute dtype. Target counts come from the
batch's loss mask up front, so gradient accumulation (a scan over microbatches) sums gradients of
already-normalised losses and equals one big batch. A step whose loss or gradients are not finite
is not applied (the state is kept and the count grows).

Objective (MiniCPM4 report, arXiv 2506.07900 §2.3.2): mean CE of x_{i+1} + mtp_weight x mean CE of x_{i+2},
the latter from the MTP head on (h_i, x_{i+1}) through the shared output head.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_params, param_axes
from cpmjax.model.mtp import init_mtp_params, mtp_loss, mtp_param_axes
from cpmjax.parallel.rules import logical_to_spec

State = dict[str, Any]


class Transforms(NamedTuple):
    """Maps applied in the training forward pass, gradients flowing through them
    (quantization-aware training: ``cpmjax.quant.ternary.qat_transforms``)."""

    params: Callable[[Any], Any] | None = None  # the params, before the forward pass
    activation: Callable[[jax.Array], jax.Array] | None = None  # every decoder linear's input


def transformed_forward(params: Any, cfg: ModelConfig, tokens: jax.Array,
                        transforms: Transforms | None = None, **kwargs: Any) -> Any:
    """``cpmjax.model.forward`` with ``transforms`` applied."""
    t = transforms or Transforms()
    if t.params is not None:
        params = t.params(params)
    return forward(params, cfg, tokens, act_transform=t.activation, **kwargs)
BATCH_AXES = ("batch", "length")


def nll_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of the next-token negative log-likelihood over the targets where ``mask`` is 1."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask)


def token_loss_sums(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array], dtype: Any,
                    remat: str, transforms: Transforms | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over unmasked targets, number of such targets)."""
    out = transformed_forward(params, cfg, batch["inputs"], transforms,
                              positions=batch["positions"], segment_ids=batch["segment_ids"],
                              dtype=dtype, remat=remat)
    return nll_sum(out.logits, batch["targets"], batch["loss_mask"]), jnp.sum(batch["loss_mask"])


def mtp_mask(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T-1]: position i has an MTP target x_{i+2} iff targets i and i+1 are both loss
    targets of x_i's document; the same rule as ``cpmjax.model.mtp.mtp_loss`` (a test pins it),
    needed here before the forward pass to normalise accumulated microbatches."""
    seg = batch["segment_ids"]
    return batch["loss_mask"][:, :-1] * batch["loss_mask"][:, 1:] * (seg[:, :-1] == seg[:, 1:])


def split_trainable(tree: Any, with_mtp: bool) -> tuple[Any, Any]:
    """(model params, MTP params or None) from the tree the optimizer sees."""
    return (tree["model"], tree["mtp"]) if with_mtp else (tree, None)


def trainable(state: State) -> Any:
    return ({"model": state["params"], "mtp": state["mtp_params"]} if "mtp_params" in state
            else state["params"])


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array,
               parametrization: str = "mup", with_mtp: bool = False) -> State:
    params = init_params(cfg, key, dtype=jnp.float32, parametrization=parametrization)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "nonfinite_steps": jnp.zeros((), jnp.int32)}
    if with_mtp:
        state["mtp_params"] = init_mtp_params(cfg, jax.random.fold_in(key, 1))
    state["opt_state"] = tx.init(trainable(state))
    return state


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _axes_by_path(cfg: ModelConfig, with_mtp: bool) -> dict[tuple[str, ...], tuple]:
    """Logical axes keyed by key path: the params, and the MTP head both as stored in the state
    (``mtp_params``) and as seen by the optimizer (``mtp``)."""
    leaves = lambda tree: jax.tree.leaves_with_path(tree, is_leaf=lambda a: isinstance(a, tuple))
    out = {_path_names(p): a for p, a in leaves(param_axes(cfg))}
    if with_mtp:
        for p, a in leaves(mtp_param_axes(cfg)):
            out[("mtp_params", *_path_names(p))] = out[("mtp", *_path_names(p))] = a
    return out


def state_shardings(cfg: ModelConfig, abstract_state: State, mesh: Mesh) -> State:
    """Shardings of every state leaf from the one rules table.

    Optimizer-state leaves (Adam moments) mirror the params; each takes the logical axes of the
    parameter whose key path ends its own path, and scalars are replicated.
    """
    by_path = _axes_by_path(cfg, "mtp_params" in abstract_state)

    def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        names = _path_names(path)
        for start in range(len(names)):
            if names[start:] in by_path and len(by_path[names[start:]]) == len(leaf.shape):
                spec = logical_to_spec(by_path[names[start:]], mesh, shape=leaf.shape)
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map_with_path(leaf_sharding, abstract_state)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(BATCH_AXES, mesh, shape=shape))


def make_grad_fn(cfg: ModelConfig, *, grad_accum: int = 1, dtype: Any = jnp.float32,
                 remat: str = "none", mtp_weight: float = 0.0,
                 freeze_model: bool = False, mtp_distill: bool = False,
                 transforms: Transforms | None = None) -> Callable[..., Any]:
    """``grads(tree, batch) -> (grads, metrics)`` of the mean-token objective over the whole batch,
    accumulated over ``grad_accum`` microbatches (scan); ``tree`` is what the optimizer sees.
    ``freeze_model``: the model is a constant (zero gradients, no backward pass through it).
    ``mtp_distill``: the MTP head learns the model's own next-next-token distribution.
    ``transforms``: maps inside the forward pass (:class:`Transforms`)."""
    with_mtp = mtp_weight > 0

    def objective(tree: Any, micro: dict[str, jax.Array], counts: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
        params, mtp_params = split_trainable(tree, with_mtp)
        if freeze_model:
            params = jax.lax.stop_gradient(params)
        out = transformed_forward(params, cfg, micro["inputs"], transforms,
                                  positions=micro["positions"],
                                  segment_ids=micro["segment_ids"], dtype=dtype, remat=remat)
        sums = [nll_sum(out.logits, micro["targets"], micro["loss_mask"])]
        if with_mtp:
            teacher = out.logits if mtp_distill else None
            sums.append(mtp_loss(mtp_params, params, cfg, out.hidden, micro, teacher)[0])
        sums = jnp.stack(sums)
        weights = jnp.asarray([1.0, mtp_weight][:len(sums)])
        return jnp.sum(weights * sums / counts), sums

    def grad_fn(tree: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        counts = [jnp.sum(batch["loss_mask"])] + ([jnp.sum(mtp_mask(batch))] if with_mtp else [])
        counts = jnp.maximum(jnp.stack(counts), 1.0)
        value_and_grad = jax.value_and_grad(objective, has_aux=True)
        if grad_accum == 1:
            (_, sums), grads = value_and_grad(tree, batch, counts)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def body(acc: Any, mb: dict[str, jax.Array]) -> tuple[Any, None]:
                (_, s), g = value_and_grad(tree, mb, counts)
                return jax.tree.map(jnp.add, acc, (g, s)), None

            zeros = (jax.tree.map(jnp.zeros_like, tree), jnp.zeros(counts.shape))
            (grads, sums), _ = jax.lax.scan(body, zeros, micro)
        losses = sums / counts
        metrics = {"loss": losses[0], "tokens": counts[0]}
        if with_mtp:
            metrics["mtp_loss"] = losses[1]
        return grads, metrics

    return grad_fn


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    dtype: Any = jnp.float32, remat: str = "none",
                    mtp_weight: float = 0.0, freeze_model: bool = False,
                    mtp_distill: bool = False,
                    transforms: Transforms | None = None) -> Callable[..., Any]:
    """``step(state, batch) -> (state, metrics)``; batch leaves are ``[global_batch, T]``.
    ``freeze_model``: only the MTP head learns (draft training on a frozen target);
    ``mtp_distill``: its labels are the model's own predictions (see ``mtp_loss``);
    ``transforms``: see :class:`Transforms`."""
    grad_fn = make_grad_fn(cfg, grad_accum=grad_accum, dtype=dtype, remat=remat,
                           mtp_weight=mtp_weight, freeze_model=freeze_model,
                           mtp_distill=mtp_distill, transforms=transforms)

    def step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        tree = trainable(state)
        grads, metrics = grad_fn(tree, batch)
        loss = metrics["loss"] + mtp_weight * metrics.get("mtp_loss", 0.0)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], tree)
        new_tree = optax.apply_updates(tree, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, mtp_params = split_trainable(keep(new_tree, tree), "mtp_params" in state)
        if freeze_model:  # weight decay would still move it
            params = state["params"]
        new_state = {**state, "step": state["step"] + 1, "params": params,
                     "opt_state": keep(opt_state, state["opt_state"]),
                     "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32)}
        if mtp_params is not None:
            new_state["mtp_params"] = mtp_params
        return new_state, {**metrics, "grad_norm": grad_norm, "finite": finite}

    return step


def make_eval_step(cfg: ModelConfig, dtype: Any = jnp.float32,
                   transforms: Transforms | None = None) -> Callable[..., Any]:
    def eval_step(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return token_loss_sums(params, cfg, batch, dtype, "none", transforms)

    return eval_step


def jit_train_step(step: Callable[..., Any], state_sh: State, mesh: Mesh,
                   batch_shape: tuple[int, ...]) -> Callable[..., Any]:
    bsh = batch_sharding(mesh, batch_shape)
    return jax.jit(step, in_shardings=(state_sh, bsh), out_shardings=(state_sh, None),
                   donate_argnums=0)

