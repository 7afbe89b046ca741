"""Checkpoints: orbax training checkpoints (state + data iterator + config) and cpmjax model
checkpoints (config.json + params) that ``cpmjax.load`` reads.

A training checkpoint that fails to restore (a partial or corrupt latest step) is reported with a
warning and the previous good step is used; nothing is ever loaded silently from a broken one.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from cpmjax.atomic import atomic_dir, write_text
from cpmjax.config import ModelConfig
from cpmjax.model.params import Params, abstract_params
from cpmjax.model.mtp import init_mtp_params

CKPT_DIR = "checkpoints"


INTEGRITY_FILE = "cpmjax_integrity.json"
ITEMS = ("state", "data", "config")


def _file_digests(step_dir: Path) -> dict[str, list[Any]]:
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != INTEGRITY_FILE)
    return {str(p.relative_to(step_dir)): [p.stat().st_size,
                                           hashlib.sha256(p.read_bytes()).hexdigest()]
            for p in files}


def seal(step_dir: Path) -> None:
    """Record size and sha256 of every file of a finished save (written atomically, last)."""
    write_text(step_dir / INTEGRITY_FILE, json.dumps(_file_digests(step_dir)))


def check_sealed(step_dir: Path) -> str | None:
    """None if the step's files match its seal, else why not (missing seal = unfinished save)."""
    seal_file = step_dir / INTEGRITY_FILE
    if not seal_file.is_file():
        return f"no {INTEGRITY_FILE} (the save did not finish)"
    want, have = json.loads(seal_file.read_text()), _file_digests(step_dir)
    bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    return f"{len(bad)} file(s) missing or changed, e.g. {bad[0]}" if bad else None


class TrainCheckpointer:
    """Orbax ``CheckpointManager`` (async, keep-N) of state + data-iterator state + config.

    Orbax only renames a step into place once written, but a finished step can still be damaged
    later; so each step this process saved is sealed with a checksum file once orbax reports it
    finished, and restoring walks back from the newest step to the newest one whose seal matches
    and which restores, warning about every step it skips.
    """

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 3,
                 async_save: bool = True) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save)
        self.directory = Path(workdir).absolute() / CKPT_DIR
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._unsealed: list[int] = []

    def _seal_finished(self) -> None:
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                if (self.directory / str(step)).is_dir():  # keep-N may have removed it
                    seal(self.directory / str(step))
        self._unsealed = []

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        self._seal_finished()
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state),
                                                        config=ocp.args.JsonSave(config)))
        self._unsealed.append(step)

    def restore(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data iterator state) of the newest good checkpoint, or None."""
        for step in good_steps(self.directory, self.manager.all_steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
                return step, out["state"], out["data"]
            except Exception as e:  # orbax raises many types for a damaged step
                warnings.warn(f"checkpoint step {step} under {self.directory} could not be "
                              f"restored ({type(e).__name__}: {e}); using the previous one")
        return None

    def close(self) -> None:
        self._seal_finished()
        self.manager.close()


def good_steps(directory: Path, steps: Any) -> Iterator[int]:
    """Steps newest first whose seal matches, warning about each one skipped."""
    for step in sorted(steps, reverse=True):
        problem = check_sealed(directory / str(step))
        if problem is None:
            yield step
        else:
            warnings.warn(f"checkpoint step {step} under {directory} is damaged or partial "
                          f"({problem}); falling back to the previous one")


def save_model(cfg: ModelConfig, params: Params, path: str | os.PathLike,
               overwrite: bool = False) -> Path:
    """A cpmjax model checkpoint: ``config.json`` + orbax ``params/``, written atomically."""
    out = Path(path).absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
    return out


def _resolve(path: str | os.PathLike) -> tuple[Path, int | None]:
    """(folder holding config.json, training step or None) for a model checkpoint, a run's
    workdir, its ``checkpoints/`` folder, or one ``checkpoints/<step>`` of it."""
    folder = Path(path).absolute()
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


def restore_from_run(workdir: Path, item: dict[str, Any], step: int | None = None
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
