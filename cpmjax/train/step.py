"""The train state and the jitted, sharded train / eval steps.

The state is a plain pytree ``{"step", "params", "opt_state", "nonfinite_steps"}``. Master weights
are float32; the forward pass casts them to the compute dtype. Gradient accumulation scans over
microbatches and normalises by the total number of target tokens, so it equals one big batch. A
step whose loss or gradients are not finite is not applied (the state is kept and the count grows).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_params, param_axes
from cpmjax.parallel.rules import logical_to_spec

State = dict[str, Any]
BATCH_AXES = ("batch", "length")


def token_loss_sums(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array], dtype: Any,
                    remat: str) -> tuple[jax.Array, jax.Array]:
    """(sum of target NLL over unmasked tokens, number of such tokens)."""
    out = forward(params, cfg, batch["inputs"], positions=batch["positions"],
                  segment_ids=batch["segment_ids"], dtype=dtype, remat=remat)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask), jnp.sum(mask)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array,
               parametrization: str = "mup") -> State:
    params = init_params(cfg, key, dtype=jnp.float32, parametrization=parametrization)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "nonfinite_steps": jnp.zeros((), jnp.int32)}


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def state_shardings(cfg: ModelConfig, abstract_state: State, mesh: Mesh) -> State:
    """Shardings of every state leaf from the one rules table.

    Optimizer-state leaves (Adam moments) mirror the params; each takes the logical axes of the
    parameter whose key path ends its own path, and scalars are replicated.
    """
    axes = param_axes(cfg)
    by_path = {_path_names(p): a for p, a in
               jax.tree.leaves_with_path(axes, is_leaf=lambda a: isinstance(a, tuple))}

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
                 remat: str = "none") -> Callable[..., Any]:
    """``grads(params, batch) -> (grads, loss, target count)``: the mean token loss over the whole
    batch and its gradient, accumulated over ``grad_accum`` microbatches (scan) and normalised by
    the total target count, so it equals one big batch whatever the per-microbatch counts."""

    def micro_grads(params: Any, micro: dict[str, jax.Array]) -> tuple[Any, tuple[Any, Any]]:
        (nll, count), grads = jax.value_and_grad(
            lambda p: token_loss_sums(p, cfg, micro, dtype, remat), has_aux=True)(params)
        return grads, (nll, count)

    def grad_fn(params: Any, batch: dict[str, jax.Array]) -> tuple[Any, jax.Array, jax.Array]:
        if grad_accum == 1:
            grads, (nll, count) = micro_grads(params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def body(acc: Any, mb: dict[str, jax.Array]) -> tuple[Any, None]:
                g, (n, c) = micro_grads(params, mb)
                return jax.tree.map(jnp.add, acc, (g, n, c)), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
            (grads, nll, count), _ = jax.lax.scan(body, zeros, micro)
        count = jnp.maximum(count, 1.0)
        return jax.tree.map(lambda g: g / count, grads), nll / count, count

    return grad_fn


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    dtype: Any = jnp.float32, remat: str = "none") -> Callable[..., Any]:
    """``step(state, batch) -> (state, metrics)``; batch leaves are ``[global_batch, T]``."""
    grad_fn = make_grad_fn(cfg, grad_accum=grad_accum, dtype=dtype, remat=remat)

    def step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]
        grads, loss, count = grad_fn(params, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"step": state["step"] + 1,
                     "params": keep(new_params, params),
                     "opt_state": keep(opt_state, state["opt_state"]),
                     "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32)}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                           "tokens": count}

    return step


def make_eval_step(cfg: ModelConfig, dtype: Any = jnp.float32) -> Callable[..., Any]:
    def eval_step(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return token_loss_sums(params, cfg, batch, dtype, "none")

    return eval_step


def jit_train_step(step: Callable[..., Any], state_sh: State, mesh: Mesh,
                   batch_shape: tuple[int, ...]) -> Callable[..., Any]:
    bsh = batch_sharding(mesh, batch_shape)
    return jax.jit(step, in_shardings=(state_sh, bsh), out_shardings=(state_sh, None),
                   donate_argnums=0)

