"""Parameter declarations: shape, logical axes and initializer of every weight, in one table.

Parameters are plain nested dicts of arrays (a pytree), layers stacked on a leading ``layers`` axis
so the forward pass scans them. ``param_axes`` gives the same tree with logical axis names, which
``cpmjax.parallel`` maps to mesh axes. Weights are stored ``[in, out]``-style for ``x @ W`` (HF
stores ``[out, in]``; ``cpmjax.convert`` transposes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from cpmjax.config import ModelConfig

Params = dict[str, Any]
Parametrization = Literal["mup", "standard"]
# How a weight is initialised: "embed" (input layer), "hidden" (matrices that grow with width),
# "output" (lm_head), "ones" (RMSNorm gains).
InitKind = Literal["embed", "hidden", "output", "ones"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: InitKind


def param_specs(cfg: ModelConfig) -> Params:
    """The table of every parameter of the decoder (tied models have no ``lm_head``)."""
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    H, KV, I, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size
    specs: Params = {
        "embed": ParamSpec((V, d), ("vocab", "embed"), "embed"),
        "layers": {
            "input_norm": ParamSpec((L, d), ("layers", "norm"), "ones"),
            "wq": ParamSpec((L, d, H, hd), ("layers", "embed", "heads", "head_dim"), "hidden"),
            "wk": ParamSpec((L, d, KV, hd), ("layers", "embed", "kv_heads", "head_dim"), "hidden"),
            "wv": ParamSpec((L, d, KV, hd), ("layers", "embed", "kv_heads", "head_dim"), "hidden"),
            "wo": ParamSpec((L, H, hd, d), ("layers", "heads", "head_dim", "embed"), "hidden"),
            "post_norm": ParamSpec((L, d), ("layers", "norm"), "ones"),
            "w_gate": ParamSpec((L, d, I), ("layers", "embed", "mlp"), "hidden"),
            "w_up": ParamSpec((L, d, I), ("layers", "embed", "mlp"), "hidden"),
            "w_down": ParamSpec((L, I, d), ("layers", "mlp", "embed"), "hidden"),
        },
        "final_norm": ParamSpec((d,), ("norm",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, V), ("embed", "vocab"), "output")
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> Params:
    """Same tree as the params, each leaf a tuple of logical axis names."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def init_std(kind: InitKind, cfg: ModelConfig, parametrization: Parametrization) -> float:
    """Initialisation std of a weight kind.

    Standard: every matrix ~ N(0, initializer_range), as HF ``MiniCPMPreTrainedModel._init_weights``.
    muP (MiniCPM-1 practice, arXiv 2404.06395; the MiniCPM4 report gives no per-parameter rules): matrices whose fan-in grows with width
    (hidden and output) use ``initializer_range / sqrt(m)`` with m = hidden_size / dim_model_base;
    the embedding keeps ``initializer_range``. At m = 1 both agree.
    """
    if kind == "ones":
        return 0.0
    if parametrization == "mup" and kind in ("hidden", "output"):
        return cfg.initializer_range / math.sqrt(cfg.width_multiplier)
    if parametrization not in ("mup", "standard"):
        raise ValueError(f"parametrization must be 'mup' or 'standard', got {parametrization!r}")
    return cfg.initializer_range


def init_params(cfg: ModelConfig, key: jax.Array, *, dtype: Any = jnp.float32,
                parametrization: Parametrization = "mup") -> Params:
    """Random parameters (norm gains in float32 whatever ``dtype`` is)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: ParamSpec, k: jax.Array) -> jax.Array:
        if spec.init == "ones":
            return jnp.ones(spec.shape, jnp.float32)
        std = init_std(spec.init, cfg, parametrization)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def abstract_params(cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """ShapeDtypeStructs of the params, with no allocation."""
    return jax.eval_shape(lambda k: init_params(cfg, k, dtype=dtype), jax.random.key(0))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters, from shapes alone (``jax.eval_shape``)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
