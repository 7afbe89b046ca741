"""Multi-host start-up: ``jax.distributed.initialize`` from arguments or the environment, or
nothing for a single process. Must run before anything touches a JAX backend."""

from __future__ import annotations

import os

import jax


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {name} is not; set both "
                         "JAX_NUM_PROCESSES and JAX_PROCESS_ID (or pass them as arguments)")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process run when one is described (arguments or JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID); a single process needs nothing.

    On TPU pods and SLURM/GPU clusters ``jax.distributed.initialize()`` finds its peers itself:
    set JAX_COORDINATOR_ADDRESS=auto to request that. CPU processes need a cross-process
    collectives backend: gloo is selected here (it only affects the CPU client, so it is harmless
    on GPU/TPU). The backend is deliberately not queried first: ``jax.distributed.initialize``
    refuses to run once a backend exists.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return
    if address == "auto":
        jax.distributed.initialize()
        return
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if not 0 <= pid < n:
        raise ValueError(f"process_id must be in [0, {n}), got {pid}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=n, process_id=pid)
