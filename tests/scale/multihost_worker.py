"""One process of the multi-host test: the real train step on a global batch split per host.

Run as ``python multihost_worker.py`` with JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/
JAX_PROCESS_ID set (or none of them for the single-process reference); prints one JSON line of
losses from process 0.
"""

from __future__ import annotations

import json

from cpmjax.train.distributed import initialize_distributed

initialize_distributed()  # before anything touches a backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cpmjax.config import ModelConfig  # noqa: E402
from cpmjax.parallel.mesh import make_mesh  # noqa: E402
from cpmjax.presets import tiny  # noqa: E402
from cpmjax.train.experiment import experiment_config  # noqa: E402
from cpmjax.train.optimizer import make_optimizer  # noqa: E402
from cpmjax.train.step import (batch_sharding, init_state, jit_train_step, make_train_step,  # noqa: E402
                               state_shardings)

GLOBAL_BATCH, SEQ, STEPS = 8, 16, 3


def main() -> None:
    cfg = ModelConfig.from_hf_config({**tiny(), "vocab_size": 256, "hidden_size": 64,
                                      "intermediate_size": 128, "num_hidden_layers": 2})
    t = experiment_config({}, "multihost").train
    t.update(schedule="constant", warmup_steps=0, lr=1e-2)
    tx = make_optimizer(t, cfg)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    step = make_train_step(cfg, tx)
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, jax.random.PRNGKey(0)))
    state_sh = state_shardings(cfg, abstract, mesh)
    state = jax.jit(lambda: init_state(cfg, tx, jax.random.PRNGKey(0)), out_shardings=state_sh)()
    shape = (GLOBAL_BATCH, SEQ)
    train = jit_train_step(step, state_sh, mesh, shape)
    per_host = GLOBAL_BATCH // jax.process_count()
    rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
    losses = []
    for s in range(STEPS):
        toks = jax.random.randint(jax.random.PRNGKey(100 + s), (GLOBAL_BATCH, SEQ + 1), 0, 256)
        full = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
                "loss_mask": jnp.ones(shape, jnp.float32), "segment_ids": jnp.ones(shape, jnp.int32),
                "positions": jnp.broadcast_to(jnp.arange(SEQ), shape)}
        local = jax.tree.map(lambda a: jax.device_get(a)[rows], full)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh, shape), v, shape)
                 for k, v in local.items()}
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    if jax.process_index() == 0:
        print(json.dumps({"losses": losses, "devices": jax.device_count(),
                          "processes": jax.process_count()}), flush=True)


if __name__ == "__main__":
    main()
