"""Two jax.distributed CPU processes on 127.0.0.1 (gloo collectives, 2 fake devices each) run the
real sharded train step on one global batch split per host; losses must equal one process with
4 devices and the same global batch (same mesh shape, so only the collective backend differs)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

_WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
_ROOT = _WORKER.parents[2]
_TIMEOUT = 240


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(_ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(procs: list[subprocess.Popen]) -> list[str]:
    try:
        outs = [p.communicate(timeout=_TIMEOUT) for p in procs]
    finally:
        for p in procs:  # always reap, even on timeout
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [o for o, _ in outs]


def _spawn(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(_WORKER)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=_ROOT)


def test_two_processes_match_one():
    addr = f"127.0.0.1:{_free_port()}"
    multi = _run([_spawn(_env(2, JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2",
                               JAX_PROCESS_ID=str(i))) for i in range(2)])
    single = _run([_spawn(_env(4))])
    got = json.loads(multi[0].strip().splitlines()[-1])
    ref = json.loads(single[0].strip().splitlines()[-1])
    assert got["processes"] == 2 and got["devices"] == 4 and ref["processes"] == 1
    assert got["losses"][-1] < got["losses"][0]  # it trains
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-6)
