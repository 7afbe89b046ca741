"""Where a study's runs execute: local processes, Ray tasks, or a TPU pod slice.

Every backend starts a run by its folder and hands back a job to poll. The local and Ray backends
run the same worker process (``python -m cpmjax.experiments.worker RUN_DIR``: train, evaluate,
write ``result.json``); Ray schedules it as a task with the study's ``resources`` on whatever
cluster ``ray.init`` joins, so a study that outgrows one machine needs no home-made scheduler.
The pod backend runs ``launch/tpu_pod.sh`` with the run's ``config.py`` (one run at a time on
the slice); the run folder must be on storage both sides see, and the runner evaluates the run
here once the pod finishes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import ml_collections

import cpmjax
from cpmjax.experiments import rundir

PACKAGE_ROOT = Path(cpmjax.__file__).resolve().parents[1]
# one XLA CPU thread per process when several runs share the cores
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class Job(Protocol):
    def poll(self) -> int | None:
        """The exit status once finished, else None."""

    def cancel(self) -> None:
        """Stop the run (it resumes from its checkpoint next time)."""


class Backend(Protocol):
    slots: int  # runs in flight at once
    evaluates: bool  # whether its jobs write result.json themselves

    def start(self, run_dir: Path) -> Job: ...

    def close(self) -> None: ...


def worker_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cpmjax.experiments.worker", str(run_dir)]


def worker_env(threads: int | None) -> dict[str, str]:
    """The runner's environment with this cpmjax first on the path (the worker imports the
    same code as the runner) and, for one thread, XLA limited to one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if threads == 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA}".strip()
    return env


class _Process:
    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
                 ) -> None:
        self._log = open(log, "a", encoding="utf-8")
        self._log.write(f"$ {' '.join(cmd)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and not self._log.closed:
            self._log.close()
        return rc

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.poll()


class LocalBackend:
    """``slots`` worker processes at once on this machine; with more slots than cores each
    process gets one XLA thread. ``lock_file``: each run holds that ``flock`` while it trains
    (on a shared machine, heavy jobs of any origin then run one at a time, and the lock is free
    between runs); ``nice``: the workers' niceness."""

    evaluates = True

    def __init__(self, slots: int = 1, lock_file: str = "", nice: int = 0) -> None:
        self.slots, self.lock_file, self.nice = slots, lock_file, nice
        cores = os.cpu_count() or 1
        self.threads = max(1, cores // slots) if slots > 1 else None

    def start(self, run_dir: Path) -> Job:
        prefix = (["flock", self.lock_file] if self.lock_file else []) + (
            ["nice", "-n", str(self.nice)] if self.nice else [])
        return _Process(prefix + worker_command(run_dir), worker_env(self.threads),
                        run_dir / rundir.LOG)

    def close(self) -> None:
        pass


def _run_worker_process(cmd: list[str], env: dict[str, str], log: str) -> int:
    """The body of a Ray task: the worker process, its output appended to the run's log."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}  (ray task)\n")
        f.flush()
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode


class _RayJob:
    def __init__(self, ray: Any, ref: Any) -> None:
        self.ray, self.ref = ray, ref

    def poll(self) -> int | None:
        done, _ = self.ray.wait([self.ref], timeout=0)
        if not done:
            return None
        try:
            return int(self.ray.get(self.ref))
        except Exception:  # the task itself died (node lost, worker killed)
            return -1

    def cancel(self) -> None:
        self.ray.cancel(self.ref, force=True)


class RayBackend:
    """Each run is a Ray task with ``resources`` (``num_cpus``, ``num_gpus``); ``address``: join
    that cluster ("auto", host:port), or empty to start a local one."""

    evaluates = True

    def __init__(self, slots: int, resources: dict[str, float], address: str = "",
                 num_cpus: int | None = None) -> None:
        import ray

        self.ray, self.slots = ray, slots
        self._started = not ray.is_initialized()
        if self._started:
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kw["address"] = address
            else:
                kw["num_cpus"] = num_cpus
            ray.init(**kw)
        self._task = ray.remote(num_cpus=float(resources.get("num_cpus", 1.0)),
                                num_gpus=float(resources.get("num_gpus", 0.0)),
                                max_retries=0)(_run_worker_process)
        self.threads = max(1, int(resources.get("num_cpus", 1.0)))

    def start(self, run_dir: Path) -> Job:
        ref = self._task.remote(worker_command(run_dir), worker_env(self.threads),
                                str(run_dir / rundir.LOG))
        return _RayJob(self.ray, ref)

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


class TpuPodBackend:
    """``launch/tpu_pod.sh TPU ZONE <run>/config.py --workdir=<run>``, one run at a time."""

    evaluates = False
    slots = 1

    def __init__(self, tpu_name: str, zone: str, script: Path | None = None) -> None:
        self.tpu_name, self.zone = tpu_name, zone
        self.script = script or PACKAGE_ROOT / "launch" / "tpu_pod.sh"
        if not self.script.is_file():
            raise FileNotFoundError(f"{self.script} not found: the tpu_pod backend runs the "
                                    "checkout's launch/tpu_pod.sh")

    def start(self, run_dir: Path) -> Job:
        cmd = ["bash", str(self.script), self.tpu_name, self.zone,
               str(run_dir / rundir.CONFIG_PY), f"--workdir={run_dir}"]
        return _Process(cmd, dict(os.environ), run_dir / rundir.LOG, cwd=PACKAGE_ROOT)

    def close(self) -> None:
        pass


def make_backend(study: ml_collections.ConfigDict) -> Backend:
    if study.backend == "local":
        return LocalBackend(study.parallel, study.lock_file, study.nice)
    if study.backend == "ray":
        return RayBackend(study.parallel, study.resources.to_dict(), study.ray_address)
    return TpuPodBackend(study.tpu.name, study.tpu.zone)
