"""A training run's directory (``--workdir``): one trainer at a time, one config per run, and
nothing of an earlier run overwritten.

- **Lock.** ``train.lock`` is held with ``fcntl.flock`` while a trainer runs. The kernel drops the
  lock when its process dies, so a lock left by a killed trainer is stale by construction and the
  next trainer takes it over; the file records pid, host and start time for the error a second
  trainer gets. Object stores (``gs://``) have no such lock: there the trainer says so once and
  relies on the job scheduler running one job per workdir.
- **Config.** A workdir that holds a run (``experiment.json``) is resumed only with the same
  experiment config; the differing fields are named and nothing is written. Fields in
  ``RESUMABLE_FIELDS`` (run length, logging, checkpoint cadence, mesh, ...) may change between
  resumes; a field the stored run lacks (added to the code since) counts as unchanged.
- **New run.** ``new_run=True`` (``launch/train.py --new_run``) moves everything of the old run to
  a sibling ``<workdir>.prev-<UTC time>`` first; nothing is deleted.
- **Supervisor files.** A supervisor that keeps its own files in the workdir (the ablation
  runner's run spec, log and result) names them (``supervisor_files``); they do not make the
  workdir foreign and a new run leaves them in place.
- **Tokenizer.** The run keeps its own copy in ``<workdir>/tokenizer/``, so the run dir finds its
  tokenizer from any working directory; resuming with a different tokenizer is refused.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from typing import Any, Collection, Mapping

from cpmjax.atomic import is_remote, storage_path, write_json, write_text

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
EXPERIMENT_FILE = "experiment.json"
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# may differ between the run in a workdir and the config that resumes it: they change how long
# the run goes and what it reports, not what a step computes (orbax reshards on a new mesh)
RESUMABLE_FIELDS = frozenset({
    "name", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.peak_flops", "train.on_nonfinite", "train.nonfinite_max_consecutive",
    "train.nonfinite_max_fraction", "train.nonfinite_window", "checkpoint.every",
    "checkpoint.keep", "checkpoint.async_save", "data.cache_dir", "mesh.data", "mesh.fsdp",
    "mesh.tensor"})


class RunDirError(RuntimeError):
    """The workdir cannot be used as asked (locked, another run's config, not a run dir)."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for nested mappings (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``section.field (run: X, now: Y)`` for each field that may not change on resume."""
    old, now = flatten(stored), flatten(new)
    return [f"{k} (run: {json.dumps(old.get(k))}, now: {json.dumps(now.get(k))})"
            for k in sorted(old.keys() | now.keys())
            if k in old and k not in RESUMABLE_FIELDS and old.get(k) != now.get(k)]


class RunDir:
    """The workdir of one trainer; use as a context manager around the whole run (the lock)."""

    def __init__(self, workdir: str | os.PathLike, primary: bool = True,
                 supervisor_files: Collection[str] = ()) -> None:
        self.path = storage_path(workdir)
        self.primary = primary
        self._kept = frozenset(supervisor_files) | {LOCK_FILE}
        self._lock_fd: int | None = None

    # ---- lock -----------------------------------------------------------------------------
    def __enter__(self) -> "RunDir":
        if self.primary:
            self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if is_remote(self.path):
            log.warning("%s is on an object store, which has no file locks: make sure only one "
                        "trainer uses it", self.path)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        # the lock file is written in place, not through cpmjax.atomic: flock belongs to this
        # inode, and a rename would hand a second trainer a fresh, unlocked file
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirError(f"{self.path} is in use by another trainer ({holder}); two trainers "
                              "on one workdir would overwrite each other's checkpoints and "
                              "metrics. Wait for it to finish or stop it, or use another "
                              "--workdir") from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            print(f"{self.path / LOCK_FILE}: the previous trainer ({_holder(previous)}) stopped "
                  "without releasing it (killed); its lock is stale, taking it over", flush=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)  # an empty lock file = released cleanly
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- run contents ---------------------------------------------------------------------
    def stored_experiment(self) -> dict[str, Any] | None:
        f = self.path / EXPERIMENT_FILE
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except ValueError as e:
            raise RunDirError(f"{f} is not valid JSON ({e}); the run dir is damaged: move it "
                              "aside or pass --new_run") from e

    def _foreign_entries(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in self._kept)

    def prepare(self, experiment: Mapping[str, Any], model_config: Mapping[str, Any],
                tokenizer: str, new_run: bool = False) -> None:
        """Check the workdir against this run's config and tokenizer before anything is written;
        then (primary process) move an old run aside if asked and write the run's files."""
        stored = self.stored_experiment()
        if new_run:
            if self.primary and self._foreign_entries():
                self._move_aside()
        elif stored is not None:
            diff = config_differences(stored, experiment)
            if diff:
                raise RunDirError(
                    f"{self.path} holds a run with a different config: {'; '.join(diff)}. "
                    "Nothing was written. Resume it with its own config, use another --workdir, "
                    "or pass --new_run to start over (the old run is moved aside, not deleted)")
            self._check_tokenizer(tokenizer)
        elif self._foreign_entries():
            raise RunDirError(
                f"{self.path} is not empty and holds no cpmjax run (no {EXPERIMENT_FILE}): "
                f"{', '.join(self._foreign_entries()[:5])}. Nothing was written. Use an empty "
                "--workdir, or pass --new_run to move its contents aside")
        if not self.primary:
            return
        write_json(self.path / MODEL_CONFIG_FILE, dict(model_config))
        write_json(self.path / EXPERIMENT_FILE, dict(experiment))
        self._copy_tokenizer(tokenizer)

    def _move_aside(self) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.parent / f"{self.path.name}.prev-{stamp}"
        target.mkdir(parents=True)
        for name in self._foreign_entries():
            (self.path / name).rename(target / name)
        print(f"new run: moved the previous contents of {self.path} to {target} (nothing "
              "deleted)", flush=True)

    def _check_tokenizer(self, tokenizer: str) -> None:
        ours = self.path / TOKENIZER_DIR / "tokenizer.json"
        given = _tokenizer_json(tokenizer)
        if ours.is_file() and ours.read_bytes() != given.read_bytes():
            raise RunDirError(f"config field 'data.tokenizer': {given} differs from the "
                              f"tokenizer this run was trained with ({ours}). Nothing was "
                              "written. Resume with that tokenizer, or pass --new_run")

    def _copy_tokenizer(self, tokenizer: str) -> None:
        given = _tokenizer_json(tokenizer)
        target = self.path / TOKENIZER_DIR
        for name in TOKENIZER_FILES:
            src = given.parent / name
            if src.is_file() and not (target / name).is_file():
                target.mkdir(parents=True, exist_ok=True)
                write_text(target / name, src.read_text())


def _tokenizer_json(tokenizer: str) -> Any:
    p = storage_path(tokenizer)
    return p / "tokenizer.json" if p.is_dir() else p


def _holder(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
