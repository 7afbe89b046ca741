"""One InfLLM v2 decoder layer at MiniCPM4's real shapes, compiled ahead of time for a TPU chip.

Checks, on a CPU host with ``libtpu`` (its compiler and topologies, as MaxText's
train_compile.py does for whole models), that the sparse paths hold at real scale: a training
layer (forward + backward) over a packed row of several documents, and a decode step of one
layer into a long KV cache. Nothing is allocated; the compiled program gives per-chip memory
(``memory_analysis``), bytes and FLOPs (``cost_analysis``) and the number of Pallas TPU kernels
in the optimized HLO (``tpu_custom_call``), i.e. whether the model reaches the kernels.

The layer runs on one chip under ``shard_map`` (Mosaic kernels are not partitioned
automatically); whole-model, multi-chip figures come from ``launch/aot_compile.py``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model import abstract_params, init_cache
from cpmjax.model.rope import rope_cos_sin
from cpmjax.model.transformer import decoder_layer


def _chip(topology: str) -> Any:
    from jax.experimental import topologies
    from jax.sharding import Mesh

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    return Mesh(np.asarray(devices[:1]), ("chip",))


def _one_layer(cfg: ModelConfig, dtype: Any) -> dict[str, jax.ShapeDtypeStruct]:
    layers = abstract_params(cfg)["layers"]
    return {k: jax.ShapeDtypeStruct(v.shape[1:], dtype) for k, v in layers.items()}


def packed_segments(seq_len: int, n_docs: int) -> np.ndarray:
    """Segment ids of one row of ``n_docs`` documents of uneven lengths (none block-aligned)."""
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, seq_len), n_docs - 1,
                                                   replace=False))
    return np.searchsorted(cuts, np.arange(seq_len), side="right").astype(np.int32)


def _compile(fn: Callable[..., Any], topology: str, *args: Any) -> Any:
    from jax.sharding import PartitionSpec as P

    step = jax.shard_map(fn, mesh=_chip(topology), in_specs=(P(),) * len(args), out_specs=P(),
                         check_vma=False)
    return jax.jit(step).lower(*args).compile()


def compile_train_layer(cfg: ModelConfig, topology: str, seq_len: int, n_docs: int,
                        remat: bool = True) -> Any:
    """One layer's forward and backward (gradients of all its weights and its input) on a
    packed bf16 row ``[1, seq_len]`` of ``n_docs`` documents, as ``launch/train.py`` runs it."""
    seg = packed_segments(seq_len, n_docs)
    starts = np.r_[0, np.flatnonzero(np.diff(seg)) + 1]
    pos = np.arange(seq_len) - np.repeat(starts, np.diff(np.r_[starts, seq_len]))

    def loss(layer: dict[str, jax.Array], h: jax.Array, seg: jax.Array,
             pos: jax.Array) -> jax.Array:
        cos, sin = rope_cos_sin(cfg, pos)
        body = lambda lay, x: decoder_layer(x, lay, cfg, cos=cos, sin=sin,  # noqa: E731
                                            positions=pos, segment_ids=seg, cache_kv=None)[0]
        if remat:
            body = jax.checkpoint(body)
        return body(jax.tree.map(lambda w: w.astype(jnp.bfloat16), layer), h).astype(
            jnp.float32).sum()

    args = (_one_layer(cfg, jnp.float32),
            jax.ShapeDtypeStruct((1, seq_len, cfg.hidden_size), jnp.bfloat16),
            jnp.asarray(seg)[None], jnp.asarray(pos, jnp.int32)[None])
    return _compile(jax.grad(loss, argnums=(0, 1)), topology, *args)


def compile_decode_layer(cfg: ModelConfig, topology: str, cache_len: int, batch: int) -> Any:
    """One layer's decode step (one token per row at the cache's last position) reading a bf16
    KV cache of ``cache_len`` positions and its compressed keys."""
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, cache_len, jnp.bfloat16))
    layer_cache = tuple(jax.ShapeDtypeStruct(cache[n].shape[1:], cache[n].dtype)
                        for n in ("k", "v", "kc1", "kc2"))

    def step(layer: dict[str, jax.Array], h: jax.Array, pos: jax.Array,
             *cache_kv: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        cos, sin = rope_cos_sin(cfg, pos)
        return decoder_layer(h, layer, cfg, cos=cos, sin=sin, positions=pos, segment_ids=None,
                             cache_kv=cache_kv)

    args = (_one_layer(cfg, jnp.bfloat16),
            jax.ShapeDtypeStruct((batch, 1, cfg.hidden_size), jnp.bfloat16),
            jax.ShapeDtypeStruct((batch, 1), jnp.int32), *layer_cache)
    return _compile(step, topology, *args)


def figures(compiled: Any) -> dict[str, Any]:
    """Per-chip memory (GiB), cost analysis and Pallas kernel count of a compiled program."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    return {"arguments_gib": gib(mem.argument_size_in_bytes),
            "outputs_gib": gib(mem.output_size_in_bytes),
            "temporaries_gib": gib(mem.temp_size_in_bytes),
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "pallas_kernels": compiled.as_text().count("tpu_custom_call")}
