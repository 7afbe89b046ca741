"""Compile the sharded train step for a TPU topology on a CPU machine; print per-device memory.

``python launch/aot_compile.py --preset=minicpm4_0p5b --topology=v5e:2x2 --mesh=1,4,1
--seq_len=4096 --batch=8`` needs ``libtpu`` installed (it provides the TPU compiler); nothing is
allocated: state and batch are ShapeDtypeStructs (approach: MaxText's train_compile.py with
libtpu's topologies in ``jax.experimental.topologies``).
"""

from __future__ import annotations

from typing import Any

import jax
from absl import app, flags

from cpmjax.config import ModelConfig
from cpmjax.parallel.mesh import make_mesh
from cpmjax.presets import PRESETS
from cpmjax.train.experiment import experiment_config
from cpmjax.train.optimizer import make_optimizer
from cpmjax.train.step import init_state, jit_train_step, make_train_step, state_shardings

_PRESET = flags.DEFINE_enum("preset", "minicpm4_0p5b", list(PRESETS), "model preset")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology name, e.g. v5p:2x2x1")
_MESH = flags.DEFINE_list("mesh", ["1", "-1", "1"], "data,fsdp,tensor (-1 fills)")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "sequence length")
_BATCH = flags.DEFINE_integer("batch", 0, "global batch (0 = one row per device)")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots", "dots_no_batch"], "remat")


def compile_train_step(preset: str, topology: str, mesh_axes: tuple[int, int, int], seq_len: int,
                       batch: int = 0, remat: str = "full") -> Any:
    """The compiled (not run) bf16-compute train step for ``topology``; raises if it cannot fit
    the mesh or the compiler rejects it."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    mesh = make_mesh(*mesh_axes, devices=devices)
    cfg = ModelConfig.from_hf_config(PRESETS[preset]())
    t = experiment_config({}, preset).train
    tx = make_optimizer(t, cfg)
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, jax.random.PRNGKey(0)))
    state_sh = state_shardings(cfg, abstract, mesh)
    shape = (batch or len(devices), seq_len)
    step = make_train_step(cfg, tx, dtype=jax.numpy.bfloat16, remat=remat)
    fn = jit_train_step(step, state_sh, mesh, shape)
    tok = jax.ShapeDtypeStruct(shape, jax.numpy.int32)
    batch_abs = {"inputs": tok, "targets": tok, "segment_ids": tok, "positions": tok,
                 "loss_mask": jax.ShapeDtypeStruct(shape, jax.numpy.float32)}
    return fn.lower(abstract, batch_abs).compile()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if len(_MESH.value) != 3:
        raise app.UsageError(f"--mesh needs data,fsdp,tensor, got {_MESH.value}")
    mesh = tuple(int(x) for x in _MESH.value)
    compiled = compile_train_step(_PRESET.value, _TOPOLOGY.value, mesh, _SEQ.value, _BATCH.value,
                                  _REMAT.value)
    mem = compiled.memory_analysis()
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    print(f"{_PRESET.value} on {_TOPOLOGY.value} mesh {mesh} seq {_SEQ.value}: per device "
          f"arguments {gib(mem.argument_size_in_bytes)}, outputs {gib(mem.output_size_in_bytes)}, "
          f"temporaries {gib(mem.temp_size_in_bytes)}, code {gib(mem.generated_code_size_in_bytes)}")


if __name__ == "__main__":
    app.run(main)
