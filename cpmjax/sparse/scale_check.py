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

import pathlib
import re
import tempfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model import abstract_params, init_cache
from cpmjax.model.rope import rope_cos_sin
from cpmjax.model.transformer import decoder_layer
from cpmjax.parallel.aot import tpu_devices


def _chip(topology: str) -> Any:
    from jax.sharding import Mesh

    return Mesh(np.asarray(tpu_devices(topology, 1)), ("chip",))


def _one_layer(cfg: ModelConfig, dtype: Any) -> dict[str, jax.ShapeDtypeStruct]:
    layers = abstract_params(cfg)["layers"]
    return {k: jax.ShapeDtypeStruct(v.shape[1:], dtype) for k, v in layers.items()}


def packed_segments(seq_len: int, n_docs: int) -> np.ndarray:
    """Segment ids of one row of ``n_docs`` documents of uneven lengths (none block-aligned)."""
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, seq_len), n_docs - 1,
                                                   replace=False))
    return np.searchsorted(cuts, np.arange(seq_len), side="right").astype(np.int32)


class Compiled(NamedTuple):
    lowered: Any
    compiled: Any


def _compile(fn: Callable[..., Any], topology: str, *args: Any,
             donate: tuple[int, ...] = ()) -> Compiled:
    from jax.sharding import PartitionSpec as P

    step = jax.shard_map(fn, mesh=_chip(topology), in_specs=(P(),) * len(args), out_specs=P(),
                         check_vma=False)
    lowered = jax.jit(step, donate_argnums=donate).lower(*args)
    return Compiled(lowered, lowered.compile())


def compile_train_layer(cfg: ModelConfig, topology: str, seq_len: int, n_docs: int,
                        remat: bool = True) -> Compiled:
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


def compile_decode_layer(cfg: ModelConfig, topology: str, cache_len: int,
                         batch: int) -> Compiled:
    """One layer's decode step (one token per row at the cache's last position) reading a bf16
    KV cache of ``cache_len`` positions and its compressed keys, donated as the serving
    engine's generate step donates its state (so the write is in place, not a cache copy)."""
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
    return _compile(step, topology, *args, donate=tuple(range(3, 3 + len(layer_cache))))


def compiled_hlo(c: Compiled) -> str:
    """The optimized HLO text. On v5p ``compiled.as_text()`` can fail (libtpu's SparseCore
    gather offload emits async ops that do not round-trip through HloModule protos in this
    jax/libtpu); then the program is compiled again with XLA's text dump on and the dumped
    after-optimizations module is read back."""
    try:
        return c.compiled.as_text()
    except jax.errors.JaxRuntimeError:  # printing only; the program did compile
        pass
    with tempfile.TemporaryDirectory() as tmp:
        c.lowered.compile(compiler_options={"xla_dump_to": tmp, "xla_dump_hlo_as_text": True})
        dumps = sorted(pathlib.Path(tmp).glob("*after_optimizations.txt"))
        if not dumps:
            raise RuntimeError(f"XLA wrote no after-optimizations dump to {tmp}")
        return dumps[-1].read_text()


_INSTR = re.compile(r"= \w+\[([\d,]*)\]\S* (\S+?)\(")


def materialized(hlo: str, size: int) -> list[str]:
    """Non-parameter values of at least ``size`` elements that XLA writes to memory in an
    optimized HLO text, i.e. those outside fusion bodies (a relayout fused into a gather reads
    only the gathered elements)."""
    fused = set(re.findall(r"calls=(%[\w.\-]+)", hlo))
    out, skip = [], False
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation header (or its closing brace)
            skip = line.split(" ")[0] in fused
        elif not skip and (m := _INSTR.search(line)) and m.group(2) != "parameter":
            if m.group(1) and np.prod([int(x) for x in m.group(1).split(",")]) >= size:
                out.append(line.strip())
    return out


def copies(hlo: str, size: int) -> list[str]:
    """The `materialized` values of at least ``size`` elements that are layout copies or
    transposes: a decode step that relaid out its KV cache would show them."""
    return [line for line in materialized(hlo, size)
            if _INSTR.search(line).group(2) in ("copy", "transpose", "copy-start")]


def figures(c: Compiled, cache_elements: int | None = None) -> dict[str, Any]:
    """Per-chip memory (GiB), cost analysis and Pallas kernel count of a compiled program;
    with ``cache_elements`` (one layer's K cache) also its cache-sized layout copies."""
    mem = c.compiled.memory_analysis()
    cost = c.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    hlo = compiled_hlo(c)
    return {"arguments_gib": gib(mem.argument_size_in_bytes),
            "outputs_gib": gib(mem.output_size_in_bytes),
            "temporaries_gib": gib(mem.temp_size_in_bytes),
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "pallas_kernels": hlo.count("tpu_custom_call"),
            **({} if cache_elements is None else
               {"cache_sized_copies": len(copies(hlo, cache_elements))})}
