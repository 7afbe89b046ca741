"""Multi-host start-up: ``jax.distributed.initialize`` from the environment, or nothing."""

from __future__ import annotations

import os

import jax


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process run when one is described (arguments or JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID); a single process needs nothing.

    On TPU pods ``jax.distributed.initialize()`` finds its peers itself: set
    JAX_COORDINATOR_ADDRESS=auto to request that.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return
    if address == "auto":
        jax.distributed.initialize()
        return
    n = num_processes or int(os.environ["JAX_NUM_PROCESSES"])
    pid = process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"])
    if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=n, process_id=pid)
