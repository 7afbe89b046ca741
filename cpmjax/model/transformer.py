"""The MiniCPM4 forward pass (HF modeling_minicpm.py), a pure function of (params, tokens, positions, ...).

    h = embed(tokens) * scale_emb
    for each layer:  h += attn(norm(h)) * scale_depth/sqrt(L);  h += mlp(norm(h)) * scale_depth/sqrt(L)
    logits = lm_head(norm(h) / (hidden_size / dim_model_base))      (float32)

Layers are stacked and run under ``lax.scan`` so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from cpmjax.config import ModelConfig
from cpmjax.model import attention as attn_lib
from cpmjax.model.cache import CACHE_FIELDS, KVCache, write_kv
from cpmjax.model.layers import linear, rms_norm, swiglu_mlp
from cpmjax.model.params import Params
from cpmjax.model.rope import apply_rope, rope_cos_sin
from cpmjax.parallel.sharding import constrain
from cpmjax.sparse.attend import sparse_tree_attend
from cpmjax.sparse.cache import truncate_compressed, update_compressed
from kernels.attention.reference import masked_attention
from kernels.infllmv2.layout import heads_view

HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class TreeAttention(NamedTuple):
    """Queries that are nodes of a speculation tree (EAGLE-2, arXiv 2406.16858; SpecInfer,
    arXiv 2305.09781), not a sequence: siblings share a RoPE position, so a position-addressed
    cache cannot hold them at their positions. Each query's key/value is written at its own cache
    ``slots [B, T]`` (negative: not written) beyond the committed tokens, and attention follows
    the explicit ``mask [B, T, S]`` over cache slots (the committed prefix plus the query's
    ancestors and itself), with S the positions the layer reads (``kv_len`` or the whole cache).
    A sparse model's compressed keys are not updated here: the slots hold candidates, and the
    caller rewrites the accepted path at its positions (``cpmjax.serve.tree``)."""

    slots: jax.Array
    mask: jax.Array


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # float32 [B, T, V], None when not asked for
    hidden: jax.Array  # last block's output before the final norm, [B, T, d]
    cache: KVCache | None


def embed_tokens(params: Params, cfg: ModelConfig, tokens: jax.Array,
                 dtype: Any = jnp.float32) -> jax.Array:
    """Input embedding times scale_emb."""
    return (params["embed"].astype(dtype)[tokens] * cfg.scale_emb).astype(dtype)


def lm_head(params: Params, cfg: ModelConfig, hidden: jax.Array,
            vocab_ids: jax.Array | None = None, head: jax.Array | None = None) -> jax.Array:
    """Final norm, division by the muP width multiplier, projection; float32 logits.

    The division applies with tied heads too (the MLX port skips it there; HF modeling_minicpm.py does not).
    ``vocab_ids`` restricts the projection to those rows (FR-Spec draft head; CPM.cu speculative/eagle.py); logits
    then index the subset, ``[..., len(vocab_ids)]``. ``head``: as for :func:`project_vocab`.
    """
    h = rms_norm(hidden, params["final_norm"], cfg.rms_norm_eps)
    return project_vocab(params, cfg, h / jnp.asarray(cfg.width_multiplier, h.dtype), vocab_ids,
                         head)


def output_weight(params: Params, cfg: ModelConfig) -> jax.Array:
    """The output projection ``[d, V]``: the tied embedding's transpose, or ``lm_head``."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def project_vocab(params: Params, cfg: ModelConfig, h: jax.Array,
                  vocab_ids: jax.Array | None = None, head: jax.Array | None = None
                  ) -> jax.Array:
    """The output projection alone (tied or untied, optionally over ``vocab_ids``), float32
    logits: :func:`lm_head` without its norm and division, which CPM.cu's EAGLE draft applies
    to its output as is. ``head``: `output_weight`'s columns at ``vocab_ids``, gathered once
    (``cpmjax.serve.frspec.frspec_head``) instead of in every call; a decode step that gathers
    them re-reads the whole vocabulary's weights each time."""
    w = head
    if w is None:
        w = output_weight(params, cfg)
        if vocab_ids is not None:
            w = jnp.take(w, vocab_ids, axis=1)
    logits = linear(h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, LOGITS_AXES)


def decoder_layer(h: jax.Array, layer: Params, cfg: ModelConfig, *, cos: jax.Array,
                  sin: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                  cache_kv: tuple[jax.Array, ...] | None,
                  attn_impl: str = "auto", sparse_impl: str = "auto",
                  residual_scale: float | None = None, taps: dict[str, jax.Array] | None = None,
                  kv_len: int | None = None,
                  act_transform: Callable[[jax.Array], jax.Array] | None = None,
                  tree: TreeAttention | None = None, stepwise: bool = False,
                  ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """One pre-norm block; returns the new hidden state and the updated (k, v) cache of the layer.

    A sparse model's cache tuple is (k, v, kc1, kc2): the compressed keys are updated after the
    new keys are written and passed to attention (InfLLM v2 decode, HF InfLLMv2Cache).

    ``residual_scale`` defaults to ``cfg.residual_scale``; the MTP/EAGLE draft layer passes
    scale_depth/sqrt(L+1) because it counts as layer L+1 (CPM.cu ``speculative/eagle.py``).
    ``taps``, when given, receives the input of every linear (``attn_in``, ``wo_in``, ``mlp_in``,
    ``down_in``) so GPTQ calibration (``cpmjax.quant``) reads the exact activations of this code.
    ``kv_len`` (static; with a cache): attention reads only cache positions (and compressed
    keys) below it, which the caller guarantees hold every position a query may see (the
    serving engine's length buckets: a short request in a long-context cache does not read the
    whole cache).
    ``act_transform`` maps the input of every linear before its matmul (int8 activations of
    quantization-aware training, ``cpmjax.quant.ternary``); taps see the untransformed input.
    ``attn_impl`` / ``sparse_impl``: dense and InfLLM v2 kernel names (``attention.attend``).
    ``tree`` (with a cache): the queries are speculation-tree nodes (`TreeAttention`).
    ``stepwise`` (with a cache): the tokens are decode steps checked at once (`forward`).
    """
    h = constrain(h, HIDDEN_AXES)
    dt = h.dtype
    act = act_transform or (lambda a: a)
    scale = jnp.asarray(cfg.residual_scale if residual_scale is None else residual_scale, dt)
    x = rms_norm(h, layer["input_norm"], cfg.rms_norm_eps)
    if taps is not None:
        taps["attn_in"] = x
    xa = act(x)
    q = linear(xa, layer["wq"].astype(dt))
    k = linear(xa, layer["wk"].astype(dt))
    v = linear(xa, layer["wv"].astype(dt))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    compressed = None
    if tree is not None:
        out, new_cache = _tree_attend(q, k, v, cache_kv, tree, cfg, kv_len, positions,
                                      sparse_impl)
    elif cache_kv is None:
        keys, values, kv_pos, kv_seg = k, v, positions, segment_ids
        new_cache = None
    else:
        keys = write_kv(cache_kv[0], k, positions)
        values = write_kv(cache_kv[1], v, positions)
        new_cache = (keys, values)
        if len(cache_kv) == 4 and cfg.sparse_config is not None:
            # the kernels whose last key was just written (O(new tokens))
            compressed = update_compressed(cache_kv[2:], keys, positions, cfg.sparse_config)
            new_cache = new_cache + compressed
        if kv_len is not None:
            keys, values = keys[:, :kv_len], values[:, :kv_len]
            if compressed is not None:
                compressed = truncate_compressed(compressed, kv_len, cfg.sparse_config)
        B, S = keys.shape[:2]
        kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=positions.dtype), (B, S))
        kv_seg = None
    if tree is None:
        out = attn_lib.attend(
            q, keys.astype(dt), values.astype(dt), q_pos=positions, kv_pos=kv_pos,
            q_seg=segment_ids if cache_kv is None else None, kv_seg=kv_seg, cfg=cfg,
            implementation=attn_impl, sparse_implementation=sparse_impl,
            kv_is_query=cache_kv is None, compressed=compressed, stepwise=stepwise)
    if taps is not None:
        taps["wo_in"] = out
    attn_out = linear(act(out), layer["wo"].astype(dt), n_in=2)
    h = h + attn_out * scale
    x = rms_norm(h, layer["post_norm"], cfg.rms_norm_eps)
    if taps is not None:
        taps["mlp_in"] = x
    mlp_out = swiglu_mlp(x, layer["w_gate"], layer["w_up"], layer["w_down"], taps, act_transform)
    h = h + mlp_out * scale
    return constrain(h, HIDDEN_AXES), new_cache


def _tree_attend(q: jax.Array, k: jax.Array, v: jax.Array, cache_kv: tuple[jax.Array, ...] | None,
                 tree: TreeAttention, cfg: ModelConfig, kv_len: int | None,
                 positions: jax.Array, sparse_impl: str
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Attention of tree-node queries (`TreeAttention`): new keys written at ``tree.slots``,
    then softmax attention under ``tree.mask``. Plain XLA with the whole ``[T, S]`` mask: a
    tree holds tens of nodes, so this is the size of a decode step's scores. A sparse model
    whose read reaches ``dense_len`` attends as InfLLM v2 decoding does at each node
    (`cpmjax.sparse.attend.sparse_tree_attend`)."""
    if cache_kv is None:
        raise ValueError("tree attention needs a KV cache (the committed prefix)")
    keys, values = write_kv(cache_kv[0], k, tree.slots), write_kv(cache_kv[1], v, tree.slots)
    read_k, read_v = (x if kv_len is None else x[:, :kv_len] for x in (keys, values))
    if tree.mask.shape[-1] != read_k.shape[1]:
        raise ValueError(f"tree mask covers {tree.mask.shape[-1]} cache positions, the layer "
                         f"reads {read_k.shape[1]}")
    sc = cfg.sparse_config
    if len(cache_kv) == 4 and sc is not None and not 0 < read_k.shape[1] < sc.dense_len:
        compressed = tuple(cache_kv[2:])
        if kv_len is not None:
            compressed = truncate_compressed(compressed, kv_len, sc)
        out = sparse_tree_attend(q, read_k, read_v, compressed, slots=tree.slots,
                                 mask=tree.mask, positions=positions, cfg=cfg,
                                 implementation=sparse_impl)
        return out, (keys, values) + tuple(cache_kv[2:])
    out = masked_attention(q, heads_view(read_k, cfg.head_dim).astype(q.dtype),
                           heads_view(read_v, cfg.head_dim).astype(q.dtype), tree.mask,
                           cfg.head_dim ** -0.5)
    return out, (keys, values) + tuple(cache_kv[2:])


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            cache: KVCache | None = None, dtype: Any = jnp.float32, return_logits: bool = True,
            remat: str = "none", attn_impl: str = "auto", sparse_impl: str = "auto",
            layer_transform: Callable[[Params], Params] | None = None,
            kv_len: int | None = None,
            act_transform: Callable[[jax.Array], jax.Array] | None = None,
            tree: TreeAttention | None = None, stepwise: bool = False) -> ModelOutput:
    """Run the decoder.

    Args:
      tokens: int ``[B, T]``.
      positions: int ``[B, T]`` absolute positions (default ``arange(T)``); with a cache, tokens are
        written at these positions and a negative position marks a padding token (not written).
      segment_ids: int ``[B, T]`` document ids of packed rows (no attention across documents).
        Not used with a cache.
      cache: from :func:`cpmjax.model.cache.init_cache`; returned updated.
      dtype: compute dtype (weights are cast to it; norms, RoPE, softmax and logits stay float32).
      remat: a key of ``REMAT_POLICIES`` (rematerialisation of each layer in the backward pass).
      layer_transform: maps one layer's params before use, inside the scan (``cpmjax.quant``
        dequantizes packed weights there, so only one layer is ever dequantized at a time).
      kv_len: with a cache, attend only to its first ``kv_len`` positions (see `decoder_layer`).
      act_transform: maps every decoder linear's input (see `decoder_layer`).
      tree: the tokens are speculation-tree nodes (`TreeAttention`; needs a cache; ``positions``
        are then their RoPE positions only).
      stepwise: with a cache, the tokens are consecutive decode steps checked at once
        (speculative verification): InfLLM v2 decides dense or sparse mode at each position,
        as one-token decoding does, not once per call as HF does for a prefill.
      attn_impl, sparse_impl: names in the dense attention registry (``kernels.attention``) and
        InfLLM v2's (``kernels.infllmv2``); ``"auto"`` is the platform default.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    cos, sin = rope_cos_sin(cfg, jnp.maximum(positions, 0))
    h = embed_tokens(params, cfg, tokens, dtype)

    def body(carry: jax.Array, xs: tuple[Params, Any]) -> tuple[jax.Array, Any]:
        layer, cache_kv = xs
        if layer_transform is not None:
            layer = layer_transform(layer)
        return decoder_layer(carry, layer, cfg, cos=cos, sin=sin, positions=positions,
                             segment_ids=segment_ids, cache_kv=cache_kv, attn_impl=attn_impl,
                             sparse_impl=sparse_impl, kv_len=kv_len,
                             act_transform=act_transform, tree=tree, stepwise=stepwise)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    if cache is None:
        h, _ = jax.lax.scan(body, h, (params["layers"], None))
        new_cache = None
    else:
        h, new_cache = _scan_with_cache(body, h, params["layers"], cache)
    logits = lm_head(params, cfg, h) if return_logits else None
    return ModelOutput(logits, h, new_cache)


def _scan_with_cache(body: Callable[..., Any], h: jax.Array, layers: Params,
                     cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The layer scan with the whole cache in the carry, each layer's slice read and written back
    in place. Passing the cache as scan ``xs``/``ys`` instead made XLA copy the full cache every
    decode step (seen in the compiled HLO as whole-cache ``copy`` ops)."""
    names = [n for n in CACHE_FIELDS if n in cache]

    def step(carry: tuple[jax.Array, tuple[jax.Array, ...]], xs: tuple[Params, jax.Array]
             ) -> tuple[tuple[jax.Array, tuple[jax.Array, ...]], None]:
        h, kv = carry
        layer, i = xs
        h, new = body(h, (layer, tuple(jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False)
                                       for c in kv)))
        kv = tuple(jax.lax.dynamic_update_index_in_dim(c, n.astype(c.dtype), i, 0)
                   for c, n in zip(kv, new))
        return (h, kv), None

    n_layers = cache[names[0]].shape[0]
    (h, kv), _ = jax.lax.scan(step, (h, tuple(cache[n] for n in names)),
                              (layers, jnp.arange(n_layers)))
    return h, dict(zip(names, kv))
