"""Ahead-of-time compiles for TPU topologies on a CPU host: does a step fit, does it run the
Pallas kernels, what does it move.

With ``libtpu`` installed, ``jax.experimental.topologies`` gives the devices of a TPU slice that
``jit(...).lower(...).compile()`` can target without a chip (approach: MaxText's
``train_compile.py``). Nothing is allocated: every input is a ``ShapeDtypeStruct``. The compiler
refuses a step that cannot fit (``CompileTimeHbmOom``), ``memory_analysis()`` gives per-device
bytes, the optimised HLO names each Pallas TPU kernel as a ``tpu_custom_call``, and
``cost_analysis()`` gives FLOPs and bytes accessed.

Steps: the sharded train step (``cpmjax.train.step``), the serving engine's step functions
(``cpmjax.serve.engine``): the last prefill chunk of a prompt (its cache span the whole prompt)
and one decode step over a full cache, and one round of tree speculative decoding
(``cpmjax.serve.tree_engine``: draft tree, tree-masked verify, acceptance, KV compaction).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.parallel.mesh import make_mesh
from cpmjax.parallel.sharding import InMesh

# HBM per chip, GiB (Google Cloud TPU system architecture pages: v4 32, v5e 16, v5p 95, v6e 32);
# the compiler's own limit is what decides a fit, this only turns bytes into a fraction
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.74, "v6e": 32.0}


def hbm_bytes(topology: str) -> float:
    name = topology.split(":")[0]
    if name not in HBM_GIB:
        raise ValueError(f"no HBM size known for topology {topology!r}; known: {list(HBM_GIB)}")
    return HBM_GIB[name] * 2**30


def tpu_devices(topology: str, num_devices: int | None = None) -> list[Any]:
    """The (abstract) devices of TPU ``topology``, or its first ``num_devices``, for compiling
    ahead of time on a host without the chips."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    return list(devices[:num_devices] if num_devices else devices)


def tpu_mesh(topology: str, mesh_axes: tuple[int, int, int], num_devices: int | None = None):
    """A (data, fsdp, tensor) mesh over the devices of ``topology`` (or its first
    ``num_devices``)."""
    return make_mesh(*mesh_axes, devices=tpu_devices(topology, num_devices))


def enable_hlo_dump() -> str:
    """Make XLA write each compiled module's optimised HLO text to a fresh folder (returned);
    call before JAX starts a backend. ``compiled.as_text()`` fails on some TPU modules
    (a ``RET_CHECK`` on async instructions when the HLO proto is read back: the 0.5B step at
    4K, libtpu 0.0.52); the compiler's own dump does not."""
    folder = tempfile.mkdtemp(prefix="cpmjax-aot-hlo-")
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={folder}", "--xla_dump_hlo_as_text",
        "--xla_dump_hlo_module_re=^jit_"]))
    return folder


def hlo_text(compiled: Any, dump_dir: str | None = None) -> str:
    """The optimised HLO of a compiled TPU function: ``as_text()``, or the newest
    ``*after_optimizations.txt`` in ``dump_dir`` (see ``enable_hlo_dump``); the dump folder is
    removed either way."""
    try:
        return compiled.as_text()
    except jax.errors.JaxRuntimeError:
        if dump_dir is None:
            raise
        files = sorted(Path(dump_dir).glob("*after_optimizations.txt"),
                       key=lambda p: p.stat().st_mtime)
        if not files:
            raise RuntimeError(f"as_text() failed and {dump_dir} holds no optimised HLO dump")
        return files[-1].read_text()
    finally:
        if dump_dir is not None:
            shutil.rmtree(dump_dir, ignore_errors=True)


def kernel_counts(hlo: str) -> dict[str, int]:
    """Pallas TPU kernels in optimised HLO text, in total and per kernel name (the HLO
    instruction is named after the kernel, e.g. ``%splash_mha_dq_segmented_no_residuals.1``)."""
    calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    names: dict[str, int] = {}
    for line in calls:
        m = re.match(r"\s*(?:ROOT )?%([\w\-]+?)(?:\.\d+)? = ", line)
        key = m.group(1) if m else "unnamed"
        names[key] = names.get(key, 0) + 1
    return {"total": len(calls), **dict(sorted(names.items()))}


def report(compiled: Any, topology: str, dump_dir: str | None = None,
           cache: set[tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Per-device memory (GiB), its fraction of HBM, Pallas kernel counts, FLOPs and bytes; with
    ``cache`` (`cache_shapes`) also the layout copies of cache-shaped values
    (`cache_copies`): a serving step that relays out its cache shows them."""
    mem = compiled.memory_analysis()
    gib = lambda b: round(b / 2**30, 3)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    resident = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    hlo = hlo_text(compiled, dump_dir)
    extra = {} if cache is None else {"cache_sized_copies": len(cache_copies(hlo, cache))}
    return {
        "per_device_gib": {"arguments": gib(mem.argument_size_in_bytes),
                           "outputs": gib(mem.output_size_in_bytes),
                           "temporaries": gib(mem.temp_size_in_bytes),
                           "code": gib(mem.generated_code_size_in_bytes),
                           "arguments_plus_temporaries": gib(resident)},
        "hbm_gib": gib(hbm_bytes(topology)),
        "hbm_fraction": round(resident / hbm_bytes(topology), 4),
        "pallas_kernels": kernel_counts(hlo),
        "cost": {"flops": float(cost.get("flops", 0.0)),
                 "bytes_accessed": float(cost.get("bytes accessed", 0.0))},
        **extra,
    }


def _abstract(tree: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def compile_train_step(cfg: ModelConfig, exp_train: Any, mesh: Any, seq_len: int, batch: int,
                       remat: str = "full", attn_impl: str = "auto",
                       sparse_impl: str = "auto") -> Any:
    """The compiled (not run) bf16-compute train step on ``mesh``; raises if the compiler
    rejects it (e.g. it does not fit)."""
    from cpmjax.train.optimizer import make_optimizer
    from cpmjax.train.step import init_state, jit_train_step, make_train_step, state_shardings

    tx = make_optimizer(exp_train, cfg)
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, jax.random.PRNGKey(0)))
    state_sh = state_shardings(cfg, abstract, mesh)
    shape = (batch, seq_len)
    step = make_train_step(cfg, tx, dtype=jnp.bfloat16, remat=remat, attn_impl=attn_impl,
                           sparse_impl=sparse_impl)
    fn = jit_train_step(step, state_sh, mesh, shape)
    tok = jax.ShapeDtypeStruct(shape, jnp.int32)
    batch_abs = {"inputs": tok, "targets": tok, "segment_ids": tok, "positions": tok,
                 "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32)}
    return fn.lower(abstract, batch_abs).compile()


def _engine(cfg: ModelConfig, max_len: int, slots: int, chunk: int, attn_impl: str,
            sparse_impl: str):
    from cpmjax.serve.engine import DecodeEngine

    return DecodeEngine(cfg, max_slots=slots, max_len=max_len, chunk=chunk, dtype=jnp.bfloat16,
                        attn_impl=attn_impl, sparse_impl=sparse_impl)


def _serving_params(cfg: ModelConfig, sharding: Any) -> Any:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16))
    return _abstract(params, sharding)


def compile_prefill_chunk(cfg: ModelConfig, mesh: Any, seq_len: int, chunk: int,
                          attn_impl: str = "auto", sparse_impl: str = "auto") -> Any:
    """The engine's prefill step for the last ``chunk`` tokens of a ``seq_len``-token prompt:
    bf16 weights and cache on one chip of ``mesh``, attention over the whole prompt's cache."""
    from cpmjax.model import init_cache

    rep = NamedSharding(mesh, PartitionSpec())
    engine = _engine(cfg, seq_len, 1, chunk, attn_impl, sparse_impl)
    cache = _abstract(jax.eval_shape(lambda: init_cache(cfg, 1, seq_len, jnp.bfloat16)), rep)
    tok = jax.ShapeDtypeStruct((1, chunk), jnp.int32, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    seen = jax.ShapeDtypeStruct((cfg.vocab_size,), jnp.bool_, sharding=rep)
    fn = InMesh(engine._prefill_chunk, mesh)
    return fn.lower(_serving_params(cfg, rep), None, cache, seen, None, tok, tok, scalar, tok,
                    seq_len, False).compile()


def compile_decode_step(cfg: ModelConfig, mesh: Any, seq_len: int, slots: int,
                        attn_impl: str = "auto", sparse_impl: str = "auto") -> Any:
    """The engine's decode step for ``slots`` requests reading a ``seq_len``-token cache."""
    rep = NamedSharding(mesh, PartitionSpec())
    engine = _engine(cfg, seq_len, slots, 64, attn_impl, sparse_impl)
    state = _abstract(jax.eval_shape(engine.init_decode_state), rep)
    mask = jax.ShapeDtypeStruct((slots, engine.mask_words), jnp.uint32, sharding=rep)
    fn = InMesh(engine._generate, mesh)
    return fn.lower(_serving_params(cfg, rep), None, state, seq_len, mask).compile()


# FR-Spec vocabulary of CPM.cu's MiniCPM4 speculative decoding (its frspec_vocab_size default:
# the 32768 most frequent of 73448 tokens; github.com/OpenBMB/CPM.cu)
FRSPEC_SIZE = 32768


def cache_shapes(cfg: ModelConfig, seq_len: int, slots: int) -> set[tuple[int, ...]]:
    """Shapes of the KV cache of a ``slots`` x ``seq_len`` serving state: each field stacked
    over the layers and one layer's (the draft layer's cache has the latter)."""
    from cpmjax.model import init_cache

    leaves = jax.eval_shape(lambda: init_cache(cfg, slots, seq_len, jnp.bfloat16)).values()
    return {s for a in leaves for s in (tuple(a.shape), tuple(a.shape[1:]))}


def cache_copies(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """The layout copies (``cpmjax.sparse.scale_check.copies``) of values of a cache shape:
    a step that moves its cache in place has none. By shape, because at MiniCPM4's sizes a layer
    weight (4096 x 4096) is larger than a layer's cache and its relayouts are no cache copy."""
    from cpmjax.sparse.scale_check import copies  # it imports this module

    def shape(line: str) -> tuple[int, ...]:
        dims = re.search(r"= \w+\[([\d,]*)\]", line).group(1)
        return tuple(int(x) for x in dims.split(",") if x)

    return [line for line in copies(hlo, min(int(np.prod(s)) for s in shapes))
            if shape(line) in shapes]


def compile_tree_step(cfg: ModelConfig, mesh: Any, seq_len: int, slots: int,
                      tree: Any = (4, 4, 16), frspec_size: int | None = FRSPEC_SIZE,
                      all_greedy: bool = False, attn_impl: str = "auto",
                      sparse_impl: str = "auto", draft_form: str = "mtp") -> Any:
    """One tree speculative decoding round (``TreeEngine._tree``) for ``slots`` requests reading
    a ``seq_len``-token cache: bf16 target and draft (``init_mtp_params``), FR-Spec ids of
    ``frspec_size`` tokens (None: the draft's full head), sampled rows unless ``all_greedy``;
    ``draft_form``: how the draft meets the target (``cpmjax.model.mtp.DRAFT_FORMS``).
    A sparse model's cache from its ``dense_len`` on is verified through InfLLM v2
    (`cpmjax.sparse.attend.sparse_tree_attend`: the stage-2 kernel with its log-sum-exp)."""
    from cpmjax.model.mtp import init_mtp_params
    from cpmjax.serve.tree import check_tree_shape
    from cpmjax.serve.tree_engine import TreeEngine

    rep = NamedSharding(mesh, PartitionSpec())
    shape = check_tree_shape(tree)
    draft = _abstract(jax.eval_shape(lambda: init_mtp_params(cfg, jax.random.PRNGKey(0),
                                                             dtype=jnp.bfloat16)), rep)
    engine = TreeEngine(cfg, draft, tree=shape, policy="fixed", max_slots=slots,
                        max_len=seq_len, dtype=jnp.bfloat16, attn_impl=attn_impl,
                        sparse_impl=sparse_impl, draft_form=draft_form)
    args = {"params": draft, "vocab_ids": None}
    if frspec_size is not None:  # as the engine passes them: the ids and their gathered head
        args = {"params": draft,
                "vocab_ids": jax.ShapeDtypeStruct((frspec_size,), jnp.int32, sharding=rep),
                "head": jax.ShapeDtypeStruct((cfg.hidden_size, frspec_size), jnp.bfloat16,
                                             sharding=rep)}
    state = _abstract(jax.eval_shape(engine.init_decode_state), rep)
    fn = InMesh(engine._tree, mesh)
    return fn.lower(_serving_params(cfg, rep), args, state, seq_len, shape,
                    all_greedy).compile()


def mesh_label(mesh: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.shape.items())


def devices_used(mesh: Any) -> int:
    return int(np.prod(list(mesh.shape.values())))
