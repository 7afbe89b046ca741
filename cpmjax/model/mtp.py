"""The multi-token-prediction head (MiniCPM4 report, arXiv 2506.07900 §2.3.2), which is also the EAGLE speculative draft (CPM.cu).

One module, one parameter layout, used by the MTP training loss and by speculative decoding:

    u_t   = fc(concat(emb_norm(emb(x_{t+1})), hidden_norm(h_t))) + fc_bias        fc: [2d, d]
    h^MTP = decoder_layer(u_t)        residual scale scale_depth / sqrt(L + 1)
    logits(x_{t+2}) = lm_head(h^MTP)  (the target's final norm + muP division + projection)

Input order: the FIRST half of fc's input is the normed embedding, the SECOND half the normed
hidden state. That is CPM.cu's order (``minicpm4_eagle.cuh`` splits the HF ``fc.weight [d, 2d]``
so that its first d input columns act on the embedding). The TR's formula writes
``Concat(Norm(h), Norm(Emb(x)))``; the order can only be settled against a released checkpoint,
and no checkpoint can be read offline here, so this follows the engine that runs the released
drafts. The embedding is the target's (times scale_emb; the RMSNorm after it makes that factor
irrelevant except for eps). The draft layer sits at the positions of h_t (EAGLE convention).

Two forms of the same head (``DRAFT_FORMS``), which differ only in how it meets the target:

- ``"mtp"`` (the formulas above; the MTP training head of MiniCPM4 and cpmjax's default): h_t is
  the target's last hidden state *before* its final norm, and the output goes through the
  target's ``lm_head`` (final norm, muP division, projection);
- ``"cpmcu"``: CPM.cu's EAGLE draft (``speculative/eagle.py``, ``minicpm4_eagle.cuh``; vLLM's
  EAGLE path for MiniCPM agrees): h_t is the target's hidden state *after* its final norm, and
  the draft layer's output is projected by the head's weights alone (no final norm, no muP
  division). A released MiniCPM4 EAGLE head was trained this way; run in the other form its
  outputs stay exact (verification decides) but its acceptance drops.

In both forms the draft feeds its own raw output back as the next proposal's feature. A file
written by :func:`save_mtp` records its form in the safetensors metadata (``draft_form``); a
file without it is taken as CPM.cu's (:func:`draft_form_of`).

HF safetensors layout of the EAGLE draft (CPM.cu ``speculative/eagle.py`` loader names):
``fc.weight [d, 2d]``, ``fc.bias [d]``, ``input_norm1.weight [d]`` (embedding norm),
``input_norm2.weight [d]`` (hidden norm), and ``layers.0.<name>`` for every per-layer tensor of
the base model (``self_attn.q_proj.weight``, ..., ``mlp.down_proj.weight``; HF modeling_minicpm.py module names).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpmjax.atomic import atomic_file
from cpmjax.config import ModelConfig
from cpmjax.convert import layout
from cpmjax.model.params import Params, Parametrization, ParamSpec, init_std, param_specs
from cpmjax.model.rope import rope_cos_sin
from cpmjax.model.transformer import (TreeAttention, decoder_layer, embed_tokens, forward,
                                      lm_head, project_vocab)
from cpmjax.model.layers import rms_norm

DRAFT_FORMS = ("mtp", "cpmcu")
_FORM_KEY = "draft_form"  # safetensors metadata key save_mtp writes

_ZERO_INIT = frozenset({"fc_bias"})  # Linear biases start at zero (spec kind "ones" only groups it as 1-D)


def mtp_param_specs(cfg: ModelConfig) -> Params:
    """Shapes, logical axes and init kinds of the head: norms, fc and one decoder layer."""
    d = cfg.hidden_size
    layer = {k: ParamSpec(s.shape[1:], s.axes[1:], s.init)
             for k, s in param_specs(cfg)["layers"].items()}
    return {"emb_norm": ParamSpec((d,), ("norm",), "ones"),
            "hidden_norm": ParamSpec((d,), ("norm",), "ones"),
            "fc": ParamSpec((2 * d, d), ("mlp", "embed"), "hidden"),
            "fc_bias": ParamSpec((d,), ("norm",), "ones"),
            "layer": layer}


def mtp_param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every MTP leaf (for ``cpmjax.parallel.rules.tree_shardings``)."""
    return jax.tree.map(lambda s: s.axes, mtp_param_specs(cfg),
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def init_mtp_params(cfg: ModelConfig, key: jax.Array, *, dtype: Any = jnp.float32,
                    parametrization: Parametrization = "mup") -> Params:
    """Random head parameters with the same init rules as the decoder (norm gains float32)."""
    flat = jax.tree.leaves_with_path(mtp_param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
    keys = jax.random.split(key, len(flat))
    out: Params = {}
    for (path, spec), k in zip(flat, keys):
        name = path[-1].key
        if name in _ZERO_INIT:
            value = jnp.zeros(spec.shape, jnp.float32)
        elif spec.init == "ones":
            value = jnp.ones(spec.shape, jnp.float32)
        else:
            std = init_std(spec.init, cfg, parametrization)
            value = (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
        node = out
        for p in path[:-1]:
            node = node.setdefault(p.key, {})
        node[name] = value
    return out


def draft_residual_scale(cfg: ModelConfig) -> float:
    """scale_depth / sqrt(L + 1): the draft layer counts as layer L+1 (CPM.cu eagle.py)."""
    return cfg.scale_depth / math.sqrt(cfg.num_hidden_layers + 1)


def check_draft_form(form: str) -> str:
    if form not in DRAFT_FORMS:
        raise ValueError(f"draft form must be one of {DRAFT_FORMS}, got {form!r}")
    return form


def draft_feature(params: Params, cfg: ModelConfig, hidden: jax.Array, form: str) -> jax.Array:
    """What the head reads of the target's last hidden state (pre-final-norm ``hidden``)."""
    if check_draft_form(form) == "mtp":
        return hidden
    return rms_norm(hidden, params["final_norm"], cfg.rms_norm_eps)


def draft_logits(params: Params, cfg: ModelConfig, h: jax.Array, form: str,
                 vocab_ids: jax.Array | None = None, head: jax.Array | None = None
                 ) -> jax.Array:
    """float32 logits of the head's output ``h``, optionally over ``vocab_ids`` (FR-Spec;
    ``head``: their projection columns gathered already, as `project_vocab` takes them)."""
    if check_draft_form(form) == "mtp":
        return lm_head(params, cfg, h, vocab_ids, head)
    return project_vocab(params, cfg, h, vocab_ids, head)


def mtp_block(mtp_params: Params, params: Params, cfg: ModelConfig, hidden: jax.Array,
              next_tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
              cache_kv: tuple[jax.Array, ...] | None = None, kv_len: int | None = None,
              tree: TreeAttention | None = None,
              ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """(h^MTP [B,T,d], updated draft-layer cache tuple or None) from the feature h_t (see
:func:`draft_feature`; or the head's own previous output) and x_{t+1}.

    ``positions`` are those of h_t; with ``cache_kv`` ((k, v) ``[B,S,KV,hd]``, plus the
    compressed keys for a sparse model, as `decoder_layer`) keys are written at them, so a
    rejected draft's entries are overwritten by the next step (position-addressed);
    ``kv_len`` limits the attention read as in `decoder_layer`; ``tree``: the inputs are
    nodes of a draft tree (`cpmjax.model.transformer.TreeAttention`).
    """
    dt = hidden.dtype
    e = rms_norm(embed_tokens(params, cfg, next_tokens, dt), mtp_params["emb_norm"], cfg.rms_norm_eps)
    h = rms_norm(hidden, mtp_params["hidden_norm"], cfg.rms_norm_eps)
    u = jnp.concatenate([e, h], axis=-1) @ mtp_params["fc"].astype(dt) + mtp_params["fc_bias"].astype(dt)
    cos, sin = rope_cos_sin(cfg, jnp.maximum(positions, 0))
    return decoder_layer(u, mtp_params["layer"], cfg, cos=cos, sin=sin, positions=positions,
                         segment_ids=segment_ids, cache_kv=cache_kv,
                         residual_scale=draft_residual_scale(cfg), kv_len=kv_len, tree=tree)


def mtp_forward(mtp_params: Params, params: Params, cfg: ModelConfig, hidden: jax.Array,
                next_tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                cache_kv: tuple[jax.Array, ...] | None = None) -> jax.Array:
    """h^MTP only (training path); see :func:`mtp_block` for the cached variant."""
    return mtp_block(mtp_params, params, cfg, hidden, next_tokens, positions, segment_ids,
                     cache_kv)[0]


def mtp_logits(mtp_params: Params, params: Params, cfg: ModelConfig, hidden: jax.Array,
               next_tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
               vocab_ids: jax.Array | None = None, form: str = "mtp") -> jax.Array:
    """float32 logits of x_{t+2} from the target's pre-norm ``hidden`` in ``form``, optionally
    over ``vocab_ids``."""
    h = mtp_forward(mtp_params, params, cfg, draft_feature(params, cfg, hidden, form),
                    next_tokens, positions, segment_ids)
    return draft_logits(params, cfg, h, form, vocab_ids)


def mtp_loss(mtp_params: Params, params: Params, cfg: ModelConfig, hidden: jax.Array,
             batch: dict[str, jax.Array], teacher_logits: jax.Array | None = None,
             form: str = "mtp") -> tuple[jax.Array, jax.Array]:
    """(sum of CE of x_{i+2}, number of counted positions) for a packed batch.

    ``batch`` has ``inputs``, ``targets`` (= inputs shifted by one), ``positions``,
    ``segment_ids`` and ``loss_mask``. Position i counts iff targets i and i+1 are both loss targets
    and x_i, x_{i+2} lie in the same document, so nothing is predicted across a boundary.
    With ``teacher_logits [B, T, V]`` (the target model's logits on the same batch) the label at i
    is the target's own distribution of x_{i+2} (softmax of its logits at i+1) instead of the data
    token: a draft is judged by what the target accepts, not by the corpus (self-distillation, as
    Medusa-2, arXiv:2401.10774 §2.3.2, trains its heads).
    """
    tgt = batch["targets"]
    logits = mtp_logits(mtp_params, params, cfg, hidden, tgt, batch["positions"],
                        batch["segment_ids"], form=form)
    seg = batch["segment_ids"]
    mask = (batch["loss_mask"][:, :-1] * batch["loss_mask"][:, 1:]
            * (seg[:, :-1] == seg[:, 1:])).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    if teacher_logits is None:
        nll = -jnp.take_along_axis(logp, tgt[:, 1:, None], axis=-1)[..., 0]
    else:
        teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits[:, 1:]).astype(jnp.float32),
                                 axis=-1)
        nll = -jnp.sum(teacher * logp, axis=-1)
    return jnp.sum(nll * mask), jnp.sum(mask)


def train_draft(cfg: ModelConfig, params: Params, batches: Iterable[dict[str, Any]], steps: int,
                lr: float, *, key: jax.Array | None = None, mtp_params: Params | None = None,
                form: str = "mtp") -> Params:
    """Fit the draft head in ``form`` with the target frozen (AdamW on the mean MTP CE),
    ``steps`` batches.

    Batches are packed rows as :func:`mtp_loss` reads them. Starts from ``mtp_params`` if given.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    mtp_params = mtp_params if mtp_params is not None else init_mtp_params(
        cfg, jax.random.key(0) if key is None else key)
    tx = optax.adamw(lr, weight_decay=0.0)
    opt_state = tx.init(mtp_params)

    @jax.jit
    def step(mp: Params, st: Any, batch: dict[str, jax.Array]) -> tuple[Params, Any, jax.Array]:
        hidden = jax.lax.stop_gradient(forward(params, cfg, batch["inputs"],
                                               positions=batch["positions"],
                                               segment_ids=batch["segment_ids"],
                                               return_logits=False).hidden)

        def loss_fn(p: Params) -> jax.Array:
            s, n = mtp_loss(p, params, cfg, hidden, batch, form=form)
            return s / jnp.maximum(n, 1.0)

        loss, g = jax.value_and_grad(loss_fn)(mp)
        upd, st = tx.update(g, st, mp)
        return optax.apply_updates(mp, upd), st, loss

    it = iter(batches)
    for _ in range(steps):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()
                 if k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
        mtp_params, opt_state, _ = step(mtp_params, opt_state, batch)
    return mtp_params


# ---- HF (CPM.cu EAGLE) safetensors layout -------------------------------------------------------

def _layer_entries(cfg: ModelConfig) -> list[tuple[str, layout.Entry]]:
    """(EAGLE name, base-model entry) for the draft's one decoder layer, reusing the base table."""
    return [(e.hf_name.replace("model.layers.{i}.", "layers.0."), e)
            for e in layout.entries(cfg) if e.per_layer]


def mtp_to_hf(cfg: ModelConfig, mtp_params: Params) -> dict[str, np.ndarray]:
    """HF tensors of the draft (``[out, in]`` Linear weights)."""
    out = {"fc.weight": np.ascontiguousarray(np.asarray(mtp_params["fc"]).T),
           "fc.bias": np.asarray(mtp_params["fc_bias"]),
           "input_norm1.weight": np.asarray(mtp_params["emb_norm"]),
           "input_norm2.weight": np.asarray(mtp_params["hidden_norm"])}
    for name, e in _layer_entries(cfg):
        out[name] = layout.to_hf(e, np.asarray(mtp_params["layer"][e.path[-1]]))
    return out


def mtp_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Params:
    """Draft params from HF tensors; every expected name must be there with the right shape."""
    specs = mtp_param_specs(cfg)
    d = cfg.hidden_size

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"EAGLE draft checkpoint lacks tensor {name!r}")
        t = np.asarray(tensors[name])
        if t.shape != shape:
            raise ValueError(f"EAGLE draft tensor {name!r} has shape {t.shape}, expected {shape}")
        return t

    out: Params = {"fc": get("fc.weight", (d, 2 * d)).T, "fc_bias": get("fc.bias", (d,)),
                   "emb_norm": get("input_norm1.weight", (d,)),
                   "hidden_norm": get("input_norm2.weight", (d,)), "layer": {}}
    for name, e in _layer_entries(cfg):
        shape = specs["layer"][e.path[-1]].shape
        out["layer"][e.path[-1]] = layout.to_cpmjax(e, get(name, layout.hf_shape(e, shape)), shape)
    return jax.tree.map(jnp.asarray, out)


def save_mtp(cfg: ModelConfig, mtp_params: Params, path: str | os.PathLike,
             form: str = "mtp") -> None:
    """Write the draft as one safetensors file atomically (temp file + rename), its form in the
    metadata."""
    from safetensors.numpy import save

    with atomic_file(path, "wb") as f:
        f.write(save(mtp_to_hf(cfg, mtp_params),
                     metadata={"format": "pt", _FORM_KEY: check_draft_form(form)}))


def draft_form_of(path: str | os.PathLike) -> str:
    """The form a draft file was trained in: its ``draft_form`` metadata, else ``"cpmcu"`` (a
    file cpmjax did not write is in CPM.cu's layout, so it computes as CPM.cu does)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        form = (f.metadata() or {}).get(_FORM_KEY, "cpmcu")
    if form not in DRAFT_FORMS:
        raise ValueError(f"EAGLE draft file {path}: metadata {_FORM_KEY}={form!r} is not one of "
                         f"{DRAFT_FORMS}")
    return form


def load_mtp(cfg: ModelConfig, path: str | os.PathLike) -> Params:
    """Read a draft safetensors file written by :func:`save_mtp` or shipped as CPM.cu EAGLE."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EAGLE draft file not found: {path}")
    return mtp_from_hf(cfg, load_file(str(path)))
