"""Checkpoints: orbax training checkpoints (state + data iterator + config) and cpmjax model
checkpoints (config.json + params) that ``cpmjax.load`` reads.

A training step counts as complete once orbax has committed it and its seal
(``cpmjax_integrity.json``: size and sha256 of every file) is written; both happen in the
background, off the training thread. Restoring walks back from the newest step to the newest one
that is sealed, matches its seal, restores and holds finite numbers. The trainer moves every step
it passes over to ``checkpoints/quarantine/<step>-<reason>`` (never deleted, never loaded again,
never re-sealed), and says so; read-only loaders only skip them, with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from cpmjax.atomic import atomic_dir, is_remote, storage_path, write_text
from cpmjax.config import ModelConfig
from cpmjax.convert.export_dir import check_destination, copy_tokenizer, write_manifest
from cpmjax.model.params import Params, abstract_params
from cpmjax.model.mtp import check_draft_form, init_mtp_params
from cpmjax.train.faults import FaultPlan

CKPT_DIR = "checkpoints"
QUARANTINE_DIR = "quarantine"
INTEGRITY_FILE = "cpmjax_integrity.json"
ITEMS = ("state", "data", "config")
# the suffix orbax gives a step's folder until it commits it (orbax path/atomicity.py)
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_CHUNK = 1 << 20


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed (disk full, permissions, a step that already exists); the message
    is one line that names the step, the cause and the newest complete step."""


def _sha256(file: epath.Path) -> str:
    """Streaming hash: memory stays at one chunk whatever the file size."""
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _step_files(step_dir: epath.Path) -> dict[str, epath.Path]:
    """Every file of a step (but its seal) by path relative to the step. ``walk``, not
    ``rglob``: epath refuses recursive globs on object stores."""
    root = str(step_dir).rstrip("/") + "/"
    files = {}
    for folder, _, names in step_dir.walk():
        for name in names:
            rel = str(folder / name)[len(root):]
            if rel != INTEGRITY_FILE:
                files[rel] = folder / name
    return dict(sorted(files.items()))


def seal(step_dir: str | os.PathLike) -> None:
    """Record size and sha256 of every file of a committed step (written atomically, last)."""
    step_dir = storage_path(step_dir)
    digests = {rel: [f.stat().length, _sha256(f)] for rel, f in _step_files(step_dir).items()}
    write_text(step_dir / INTEGRITY_FILE, json.dumps(digests))


def check_sealed(step_dir: str | os.PathLike) -> tuple[str, str] | None:
    """None if the step matches its seal, else (reason tag, what is wrong, as a sentence end)."""
    step_dir = storage_path(step_dir)
    seal_file = step_dir / INTEGRITY_FILE
    if not seal_file.is_file():
        return ("unsealed", f"partial: it has no {INTEGRITY_FILE} (orbax committed it but the run "
                "stopped before sealing it, or it predates sealing), so its integrity is unknown")
    try:
        want = json.loads(seal_file.read_text())
        want = {k: (int(v[0]), str(v[1])) for k, v in want.items()}
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        return ("bad-seal", f"damaged: its {INTEGRITY_FILE} is unreadable ({type(e).__name__})")
    files = _step_files(step_dir)
    bad = sorted(k for k in want.keys() ^ files.keys())
    sized = [k for k in sorted(want.keys() & files.keys()) if files[k].stat().length == want[k][0]]
    bad += sorted(set(want.keys() & files.keys()) - set(sized))
    bad += [k for k in sized if _sha256(files[k]) != want[k][1]]
    if bad:
        return ("damaged", f"damaged: {len(bad)} file(s) missing, added or changed since it was "
                f"sealed, e.g. {sorted(bad)[0]}")
    return None


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (one compiled reduction, one
    device sync)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}" if text else type(e).__name__


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain; tensorstore reports it as text (os_error_code='28')."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _NoOrbaxTracebacks(logging.Filter):
    """Drops the traceback from orbax's error records, keeping their one-line message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" in record.pathname and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_orbax_tracebacks() -> None:
    """For launchers: a failed background save makes orbax log the same traceback from each of
    its threads (a disk-full save printed ~900 lines); the trainer reports the failure itself, in
    one line naming the step and the cause (``CheckpointSaveError``)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _NoOrbaxTracebacks) for f in logger.filters):
        logger.addFilter(_NoOrbaxTracebacks())


class TrainCheckpointer:
    """Orbax ``CheckpointManager`` (async) of state + data-iterator state + config, sealed and
    kept ``max_to_keep`` deep by this class.

    Order of a save: orbax writes the step in the background and commits it (renames it into
    place); a seal thread then waits for the commit and writes the seal. Old steps are deleted
    only once a newer one is sealed (orbax's own ``max_to_keep`` would delete them as soon as the
    newer step is committed), so a sealed step exists at every moment after the first.
    ``check()`` (cheap, every step) and ``save()`` raise ``CheckpointSaveError`` as soon as a
    background save has failed.
    """

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 3,
                 async_save: bool = True) -> None:
        self.directory = storage_path(workdir) / CKPT_DIR
        self.keep = max_to_keep
        self._faults = FaultPlan.from_env()
        self._saving: int | None = None
        self.last_complete: int | None = None
        self.failed: str | None = None  # the one-line cause once a save has failed
        self._job: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cpmjax-seal")
        self._report_unfinished()
        async_options = (ocp.AsyncOptions(post_finalization_callback=self._before_commit)
                         if async_save else None)
        options = ocp.CheckpointManagerOptions(max_to_keep=None, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save,
                                               async_options=async_options)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # ---- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Start saving ``step``; returns once orbax holds a copy, while the write goes on."""
        self._finish_previous()
        if (self.directory / str(step)).exists():
            raise CheckpointSaveError(
                f"checkpoint step {step} already exists under {self.directory}; refusing to save "
                "over it (orbax would skip the save silently)")
        self._check_space(step, state)
        self._faults.hit("before_write", step)
        self._saving = step
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config)))
        except Exception as e:  # synchronous saves fail here; async ones in check()
            raise CheckpointSaveError(self._failure(step, e)) from e
        if not saved:
            raise CheckpointSaveError(f"orbax skipped the save of step {step} under "
                                      f"{self.directory}; nothing was written")
        if self._faults.wants("mid_write", step):
            self._wait_for_partial_write(step)
            self._faults.hit("mid_write", step)
        self._job = self._pool.submit(self._seal_when_committed, step)

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse a save the local disk cannot hold before writing a byte of it: a write that
        fails half-way costs a background error and leaves a partial folder behind. (Orbax
        writes arrays uncompressed, so their byte count is what the step needs.)"""
        if is_remote(self.directory):
            return
        need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)) * 1.05 + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise CheckpointSaveError(
                f"checkpoint save of step {step} under {self.directory} refused: no space left "
                f"on device for it (it needs about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are "
                f"free); once space is freed, {self._resume_hint()}")

    def _resume_hint(self) -> str:
        return ("no step is complete yet, a rerun starts from step 0" if self.last_complete is None
                else f"a rerun resumes from step {self.last_complete}, the newest complete one")

    def _before_commit(self) -> None:
        """orbax's post_finalization_callback: every file of the step is written, the commit
        (rename) comes next. Only fault injection acts here."""
        step = self._saving
        if self._faults.wants("mid_write", step):
            time.sleep(3600)  # hold the commit: the trainer is killed while the write is open
        self._faults.hit("enospc", step)
        self._faults.hit("before_commit", step)

    def _wait_for_partial_write(self, step: int) -> None:
        """Until a file of the step's uncommitted folder is on disk (for the mid_write fault)."""
        deadline = time.time() + 60
        while time.time() < deadline:
            for tmp in self.directory.glob(f"{step}{ORBAX_TMP_SUFFIX}*"):
                if any(_step_files(tmp)):
                    return
            time.sleep(0.01)

    def _seal_when_committed(self, step: int) -> None:
        self.manager.wait_until_finished()  # raises the background write's error
        self._faults.hit("after_commit", step)
        if jax.process_index() == 0:
            seal(self.directory / str(step))
        self._faults.hit("after_seal", step)
        self.last_complete = step

    def _failure(self, step: int, e: BaseException) -> str:
        cause = "no space left on device" if _disk_full(e) else "the write failed"
        return (f"checkpoint save of step {step} under {self.directory} failed: {cause} "
                f"({_one_line(e)}); {self._resume_hint()}")

    def _finish_previous(self) -> None:
        """Wait for the previous save's seal and raise its failure; then delete the sealed
        steps beyond the newest ``keep`` (unsealed ones are left for restore to quarantine).
        After a failure nothing is deleted any more."""
        if self._job is not None:
            job, self._job = self._job, None
            try:
                job.result()
            except Exception as e:
                self.failed = self._failure(self._saving, e)
                raise CheckpointSaveError(self.failed) from e
        if self.failed:
            return
        sealed = [s for s in sorted(self.manager.all_steps())
                  if (self.directory / str(s) / INTEGRITY_FILE).is_file()]
        for step in sealed[:-self.keep]:
            self.manager.delete(step)

    def check(self) -> None:
        """Raise ``CheckpointSaveError`` at once if a background save has failed (no waiting)."""
        if self._job is not None and self._job.done() and self._job.exception() is not None:
            self._finish_previous()

    def close(self) -> None:
        """Wait for the last save to be sealed (raising its failure) and release orbax. After a
        failure already raised, orbax's copy of the same error is not raised again."""
        try:
            self._finish_previous()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self.failed:
                    raise
            finally:
                self._pool.shutdown(wait=False)

    # ---- restoring ------------------------------------------------------------------------
    def _report_unfinished(self) -> None:
        """Folders of saves a killed run left uncommitted; orbax removes them (cleanup_tmp)."""
        if not self.directory.is_dir():
            return
        for tmp in sorted(self.directory.glob(f"*{ORBAX_TMP_SUFFIX}*")):
            warnings.warn(f"checkpoint step {tmp.name.split('.')[0]} under {self.directory} was "
                          "still being written when the previous run stopped (its save never "
                          f"committed); discarding the unfinished {tmp.name}")

    def restore(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data iterator state) of the newest complete and intact step, or None.
        Every newer step is quarantined on the way, with a warning saying why."""
        moved = False
        try:
            for step in sorted(self.manager.all_steps(), reverse=True):
                problem = check_sealed(self.directory / str(step))
                if problem is None:
                    try:
                        out = self.manager.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            data=ocp.args.JsonRestore()))
                    except Exception as e:  # orbax raises many types for a damaged step
                        problem = ("unrestorable", f"damaged: orbax cannot restore it "
                                   f"({_one_line(e)[:200]})")
                    else:
                        if all_finite(out["state"]):
                            self.last_complete = step
                            return step, out["state"], out["data"]
                        problem = ("nonfinite", "damaged: it holds non-finite numbers")
                self._quarantine(step, *problem)
                moved = True
            return None
        finally:
            if moved:
                self.manager.reload()

    def _quarantine(self, step: int, tag: str, why: str) -> None:
        folder = self.directory / QUARANTINE_DIR
        target, n = folder / f"{step}-{tag}", 1
        while target.exists():
            n += 1
            target = folder / f"{step}-{tag}-{n}"
        if jax.process_index() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        warnings.warn(f"checkpoint step {step} under {self.directory} is {why}; moved it to "
                      f"{target} (kept, never loaded or re-sealed) and trying the previous step")


def good_steps(directory: str | os.PathLike, steps: Any) -> Iterator[int]:
    """Steps newest first whose seal matches, warning about each one skipped (read-only)."""
    directory = storage_path(directory)
    for step in sorted(steps, reverse=True):
        problem = check_sealed(directory / str(step))
        if problem is None:
            yield step
        else:
            warnings.warn(f"checkpoint step {step} under {directory} is {problem[1]}; skipping "
                          "it, falling back to the previous one")


def save_model(cfg: ModelConfig, params: Params, path: str | os.PathLike,
               overwrite: bool = False, tokenizer: str | os.PathLike | None = None,
               sources: Iterable[str | os.PathLike] = ()) -> Path:
    """A cpmjax model checkpoint: ``config.json`` + orbax ``params/`` (+ the tokenizer files
    next to ``tokenizer``), written atomically; ``overwrite`` replaces only a previous export
    and never one of ``sources`` (see ``cpmjax.convert.export_dir``)."""
    out = check_destination(path, overwrite, sources)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
        copy_tokenizer(tokenizer, tmp)
        write_manifest(tmp, "cpmjax")
    return out


def _resolve(path: str | os.PathLike) -> tuple[epath.Path, int | None]:
    """(folder holding config.json, training step or None) for a model checkpoint, a run's
    workdir, its ``checkpoints/`` folder, or one ``checkpoints/<step>`` of it."""
    folder = storage_path(path)
    candidates = [(folder, None), (folder.parent, None)]
    if folder.name.isdigit() and folder.parent.name == CKPT_DIR:
        candidates.append((folder.parent.parent, int(folder.name)))
    for root, step in candidates:
        if (root / "config.json").is_file() and (root == folder or (root / CKPT_DIR).is_dir()):
            return root, step
    raise FileNotFoundError(f"{folder} is neither an HF folder nor a cpmjax checkpoint or "
                            "training run (no config.json)")


def _on_device(tree: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


def load_trained_model(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """:func:`load_model` for scripts that need the README's trained model: a missing checkpoint
    is a ``FileNotFoundError`` saying how to make one."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one first "
                                "(python launch/train.py --config=configs/tiny.py)")
    return load_model(path)


def load_model(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
    """(config, params) from a model checkpoint (``save_model``) or a training run: its workdir
    or ``checkpoints/`` (the newest good step) or one ``checkpoints/<step>``. Norm gains stay
    float32; the rest is cast to ``dtype``."""
    root, step = _resolve(path)
    cfg = ModelConfig.from_hf_config(json.loads((root / "config.json").read_text()))
    target = _on_device(abstract_params(cfg))
    if step is None and (root / "params").is_dir():
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(root / "params", target)
    elif (root / CKPT_DIR).is_dir():
        params = restore_from_run(root, {"params": target}, step)["params"]
    else:
        raise FileNotFoundError(f"{root} has config.json but neither params/ nor {CKPT_DIR}/")
    norm = lambda path, x: x if str(path[-1]).strip("[]'\"").endswith("norm") else x.astype(dtype)
    return cfg, jax.tree.map_with_path(norm, params)


def load_mtp_params(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """(config, MTP head params) from a training run trained with ``train.mtp_weight > 0``
    (same paths as :func:`load_model`); ``cpmjax.model.mtp.save_mtp`` writes them as an EAGLE
    draft for speculative decoding."""
    root, step = _resolve(path)
    cfg = ModelConfig.from_hf_config(json.loads((root / "config.json").read_text()))
    if not (root / CKPT_DIR).is_dir():
        raise FileNotFoundError(f"{root} is not a training run (no {CKPT_DIR}/); MTP heads are "
                                "kept in training checkpoints")
    target = _on_device(jax.eval_shape(lambda k: init_mtp_params(cfg, k), jax.random.key(0)))
    return cfg, restore_from_run(root, {"mtp_params": target}, step)["mtp_params"]


def run_draft_form(path: str | os.PathLike) -> str:
    """The form (``cpmjax.model.mtp.DRAFT_FORMS``) a run trained its MTP head in: its
    experiment's ``train.draft_form`` (runs from before the field: ``"mtp"``)."""
    root, _ = _resolve(path)
    experiment = root / "experiment.json"
    train = json.loads(experiment.read_text()).get("train", {}) if experiment.is_file() else {}
    return check_draft_form(train.get("draft_form", "mtp"))


def restore_from_run(workdir: epath.Path, item: dict[str, Any], step: int | None = None
                     ) -> dict[str, Any]:
    """The state entries named in ``item`` (abstract targets) from a run's newest good step, or
    from ``step`` alone (a damaged one is then an error, not silently replaced)."""
    directory = workdir / CKPT_DIR
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    for s in good_steps(directory, manager.all_steps() if step is None else [step]):
        try:
            restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item))))["state"]
        except Exception as e:
            warnings.warn(f"checkpoint step {s} of {workdir} could not be restored "
                          f"({type(e).__name__}: {e}); trying the previous one")
            continue
        # orbax's partial restore hands back the abstract target for entries the step lacks
        missing = sorted({jax.tree_util.keystr(p[:1]) for p, x in
                          jax.tree.leaves_with_path(restored) if not isinstance(x, jax.Array)})
        if missing:
            raise KeyError(f"checkpoint step {s} of {workdir} has no {', '.join(missing)} "
                           "(an MTP head exists only in runs with train.mtp_weight > 0)")
        return restored
    which = f"step {step}" if step is not None else "checkpoint"
    raise FileNotFoundError(f"no restorable {which} under {directory}")
