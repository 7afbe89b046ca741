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
from cpmjax.model.transformer import lm_head
from cpmjax.parallel.rules import logical_to_spec
from cpmjax.parallel.sharding import InMesh

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
# tokens whose float32 logits are alive at once in the loss: a 32K row of MiniCPM4's 73448-token
# vocabulary would otherwise hold 9.6 GB of logits, and as much again for their gradient
LOSS_CHUNK = 2048


def nll_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of the next-token negative log-likelihood over the targets where ``mask`` is 1."""
    # logsumexp minus the target logit: no [B, T, V] log-softmax array next to the logits; the
    # target logit by a one-hot select, whose gradient fuses into the softmax's (a gather's is a
    # scatter: the tiny model's loss gradient took 67 instead of 53 ms on CPU)
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    target = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return jnp.sum((lse - target) * mask)


def nll_sum_from_hidden(params: Any, cfg: ModelConfig, hidden: jax.Array, targets: jax.Array,
                        mask: jax.Array, chunk: int = LOSS_CHUNK) -> jax.Array:
    """Sum of next-token NLL from the last hidden state, the output head run over ``chunk``
    tokens at a time and rematerialised in the backward pass (memory O(chunk x vocab))."""
    B, T, _ = hidden.shape
    if T <= chunk:
        return nll_sum(lm_head(params, cfg, hidden), targets, mask)
    n = -(-T // chunk)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
    split = lambda x: jnp.moveaxis(pad(x).reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def part(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        h, t, m = xs
        return total + nll_sum(lm_head(params, cfg, h), t, m), None

    total, _ = jax.lax.scan(part, jnp.zeros((), jnp.float32),
                            (split(hidden), split(targets), split(mask)))
    return total


def token_loss_sums(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array], dtype: Any,
                    remat: str, transforms: Transforms | None = None, attn_impl: str = "auto",
                    sparse_impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over unmasked targets, number of such targets)."""
    out = transformed_forward(params, cfg, batch["inputs"], transforms,
                              positions=batch["positions"], segment_ids=batch["segment_ids"],
                              dtype=dtype, remat=remat, return_logits=False,
                              attn_impl=attn_impl, sparse_impl=sparse_impl)
    nll = nll_sum_from_hidden(params, cfg, out.hidden, batch["targets"], batch["loss_mask"])
    return nll, jnp.sum(batch["loss_mask"])


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


def accumulate_grads(value_and_grad: Callable[..., Any], tree: Any, batch: dict[str, jax.Array],
                     grad_accum: int, aux_zeros: Any) -> tuple[Any, Any]:
    """(grads, aux) of ``value_and_grad(tree, micro) -> ((value, aux), grads)`` summed over
    ``grad_accum`` microbatches of ``batch`` (a scan). The objective must already be normalised by
    whole-batch counts, so the sums equal one big batch; ``aux_zeros`` is the shape of ``aux``."""
    if grad_accum == 1:
        (_, aux), grads = value_and_grad(tree, batch)
        return grads, aux
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def body(acc: Any, mb: dict[str, jax.Array]) -> tuple[Any, None]:
        (_, aux), g = value_and_grad(tree, mb)
        return jax.tree.map(jnp.add, acc, (g, aux)), None

    (grads, aux), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, tree), aux_zeros), micro)
    return grads, aux


def make_grad_fn(cfg: ModelConfig, *, grad_accum: int = 1, dtype: Any = jnp.float32,
                 remat: str = "none", mtp_weight: float = 0.0,
                 freeze_model: bool = False, mtp_distill: bool = False,
                 transforms: Transforms | None = None, attn_impl: str = "auto",
                 sparse_impl: str = "auto", draft_form: str = "mtp") -> Callable[..., Any]:
    """``grads(tree, batch) -> (grads, metrics)`` of the mean-token objective over the whole batch,
    accumulated over ``grad_accum`` microbatches (scan); ``tree`` is what the optimizer sees.
    ``freeze_model``: the model is a constant (zero gradients, no backward pass through it).
    ``mtp_distill``: the MTP head learns the model's own next-next-token distribution.
    ``draft_form``: the MTP head's form (``cpmjax.model.mtp.DRAFT_FORMS``).
    ``transforms``: maps inside the forward pass (:class:`Transforms`).
    ``attn_impl`` / ``sparse_impl``: attention kernel names (``cpmjax.model.attention``)."""
    with_mtp = mtp_weight > 0
    full_logits = with_mtp and mtp_distill  # the teacher needs every position's logits

    def objective(tree: Any, micro: dict[str, jax.Array], counts: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
        params, mtp_params = split_trainable(tree, with_mtp)
        if freeze_model:
            params = jax.lax.stop_gradient(params)
        out = transformed_forward(params, cfg, micro["inputs"], transforms,
                                  positions=micro["positions"],
                                  segment_ids=micro["segment_ids"], dtype=dtype, remat=remat,
                                  return_logits=full_logits, attn_impl=attn_impl,
                                  sparse_impl=sparse_impl)
        if full_logits:
            sums = [nll_sum(out.logits, micro["targets"], micro["loss_mask"])]
        else:
            sums = [nll_sum_from_hidden(params, cfg, out.hidden, micro["targets"],
                                        micro["loss_mask"])]
        if with_mtp:
            teacher = out.logits if mtp_distill else None
            sums.append(mtp_loss(mtp_params, params, cfg, out.hidden, micro, teacher,
                                 draft_form)[0])
        sums = jnp.stack(sums)
        weights = jnp.asarray([1.0, mtp_weight][:len(sums)])
        return jnp.sum(weights * sums / counts), sums

    def grad_fn(tree: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        counts = [jnp.sum(batch["loss_mask"])] + ([jnp.sum(mtp_mask(batch))] if with_mtp else [])
        counts = jnp.maximum(jnp.stack(counts), 1.0)
        value_and_grad = jax.value_and_grad(lambda t, mb: objective(t, mb, counts), has_aux=True)
        grads, sums = accumulate_grads(value_and_grad, tree, batch, grad_accum,
                                       jnp.zeros(counts.shape))
        losses = sums / counts
        metrics = {"loss": losses[0], "tokens": counts[0]}
        if with_mtp:
            metrics["mtp_loss"] = losses[1]
        return grads, metrics

    return grad_fn


def make_update_step(tx: optax.GradientTransformation, grad_fn: Callable[..., Any], *,
                     total_loss: Callable[[dict[str, jax.Array]], jax.Array] = lambda m: m["loss"],
                     freeze_model: bool = False) -> Callable[..., Any]:
    """``step(state, batch) -> (state, metrics)`` applying ``grad_fn(tree, batch) -> (grads,
    metrics)`` through ``tx``; the update is skipped (state kept, ``nonfinite_steps`` counted) when
    ``total_loss(metrics)`` or the gradient norm is not finite. State entries other than the
    trainable ones (e.g. an RL reference model) pass through unchanged."""

    def step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        tree = trainable(state)
        grads, metrics = grad_fn(tree, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total_loss(metrics)) & jnp.isfinite(grad_norm)
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


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    dtype: Any = jnp.float32, remat: str = "none",
                    mtp_weight: float = 0.0, freeze_model: bool = False,
                    mtp_distill: bool = False, transforms: Transforms | None = None,
                    attn_impl: str = "auto", sparse_impl: str = "auto",
                    draft_form: str = "mtp") -> Callable[..., Any]:
    """``step(state, batch) -> (state, metrics)``; batch leaves are ``[global_batch, T]``.
    ``freeze_model``: only the MTP head learns (draft training on a frozen target);
    ``mtp_distill``: its labels are the model's own predictions (see ``mtp_loss``);
    ``transforms``: see :class:`Transforms`."""
    grad_fn = make_grad_fn(cfg, grad_accum=grad_accum, dtype=dtype, remat=remat,
                           mtp_weight=mtp_weight, freeze_model=freeze_model,
                           mtp_distill=mtp_distill, transforms=transforms,
                           attn_impl=attn_impl, sparse_impl=sparse_impl, draft_form=draft_form)
    return make_update_step(
        tx, grad_fn, total_loss=lambda m: m["loss"] + mtp_weight * m.get("mtp_loss", 0.0),
        freeze_model=freeze_model)


def make_eval_step(cfg: ModelConfig, dtype: Any = jnp.float32,
                   transforms: Transforms | None = None, attn_impl: str = "auto",
                   sparse_impl: str = "auto") -> Callable[..., Any]:
    def eval_step(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return token_loss_sums(params, cfg, batch, dtype, "none", transforms, attn_impl,
                               sparse_impl)

    return eval_step


def jit_train_step(step: Callable[..., Any], state_sh: State, mesh: Mesh,
                   batch_shape: tuple[int, ...]) -> Callable[..., Any]:
    """The jitted step, traced and run under ``mesh`` as the context mesh (activation
    constraints and the shard_map of Pallas kernels read it; see ``cpmjax.parallel.sharding``)."""
    bsh = batch_sharding(mesh, batch_shape)
    return InMesh(jax.jit(step, in_shardings=(state_sh, bsh), out_shardings=(state_sh, None),
                           donate_argnums=0), mesh)

