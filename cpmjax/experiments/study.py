"""An ablation study: one base experiment config, named override sets, explicit seeds.

A study is an ``ml_collections`` ConfigDict (``configs/ablations/*.py`` return one from
``get_config()``, so any field is overridable on the command line, ``--study.seeds=0,1``):

- ``base``: an experiment config (``cpmjax.train.experiment.experiment_config``);
- ``overrides``: nested fields applied to every run (``{"train": {"steps": 40}}``);
- ``variants``: name -> nested fields of that variant (``{"cosine": {"train": {"schedule":
  "cosine"}}}``);
- ``seeds``: every variant runs once per seed (``train.seed``), so a rerun reproduces the table;
- ``parallel``, ``backend``, ``resources``, ``tpu``: how the runs are executed
  (``cpmjax.experiments.backends``); ``indicator``: what is evaluated after each run
  (``cpmjax.experiments.worker``).

A variant may add fields under ``model`` (any config.json key, e.g. ``sparse_config``); anywhere
else a field must already exist in the base, so a misspelt override is an error, not a no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Mapping

import ml_collections

from cpmjax.config import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+=-]*$")
BACKENDS = ("local", "ray", "tpu_pod")
# top-level sections of an experiment config where an override may create a new key
OPEN_SECTIONS = ("model",)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a study: a variant at one seed, with its resolved config."""

    name: str
    variant: str
    seed: int
    config: ml_collections.ConfigDict

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def study_config(base: ml_collections.ConfigDict, name: str,
                 variants: Mapping[str, Mapping[str, Any]] | None = None,
                 seeds: tuple[int, ...] = (0,)) -> ml_collections.ConfigDict:
    """A study around ``base`` with its execution defaults (one run at a time, locally)."""
    s = ml_collections.ConfigDict()
    s.name = name
    s.base = base
    s.overrides = ml_collections.ConfigDict()
    # in the order given (runs, table rows and curves follow it)
    s.variants = ml_collections.ConfigDict({k: dict(v) for k, v in (variants or {}).items()},
                                           sort_keys=False)
    s.seeds = list(seeds)
    s.parallel = 1  # runs at once (local backend: processes; ray: in flight)
    s.backend = "local"  # local | ray | tpu_pod
    s.lock_file = ""  # local backend: a flock each run holds while it trains
    s.nice = 0  # local backend: niceness of the worker processes
    s.max_attempts = 2  # a crashed run is started again once (it resumes from its checkpoint)
    s.resources = ml_collections.ConfigDict({"num_cpus": 1.0, "num_gpus": 0.0})  # per Ray task
    s.ray_address = ""  # empty: start a local Ray cluster; "auto" or host:port: join one
    s.tpu = ml_collections.ConfigDict({"name": "", "zone": ""})  # tpu_pod backend
    s.indicator = ml_collections.ConfigDict({
        "enabled": False,  # the ScalingBench-style indicator after each run (worker.py)
        "rows": 64,  # held-out verifiable rows it is computed on
        "accuracy": False,  # also greedy exact-match accuracy through the serving engine
    })
    return s


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not path.startswith(
                tuple(f"{s}." for s in OPEN_SECTIONS)):
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with the nested ``overrides``; errors name ``where`` and the field."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    tree = overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else overrides
    for path, value in _flatten(tree).items():
        *parents, leaf = path.split(".")
        node = out
        for i, key in enumerate(parents):
            if key not in node:
                raise ConfigError(f"{where}: config field {'.'.join(parents[:i + 1])!r} does "
                                  "not exist in the base config")
            node = node[key]
        if leaf not in node and not (parents and parents[0] in OPEN_SECTIONS):
            raise ConfigError(f"{where}: config field {path!r} does not exist in the base config "
                              f"(new fields are allowed only under {', '.join(OPEN_SECTIONS)})")
        try:
            node[leaf] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        except TypeError as e:
            raise ConfigError(f"{where}: config field {path!r}: {e}") from e
    return out


def check_study(study: ml_collections.ConfigDict) -> None:
    """Fail before anything runs, naming the study field and the rule."""
    if not isinstance(study.get("name"), str) or not NAME_RE.match(study.name):
        raise ConfigError(f"study field 'name': {study.get('name')!r} must match {NAME_RE.pattern}")
    seeds = list(study.get("seeds") or [])
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ConfigError(f"study field 'seeds': {seeds!r} must be a non-empty list of "
                          "non-negative integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"study field 'seeds': {seeds!r} has repeats")
    if not study.variants:
        raise ConfigError("study field 'variants': at least one variant is needed")
    for v in study.variants:
        if not NAME_RE.match(v):
            raise ConfigError(f"study field 'variants': name {v!r} must match {NAME_RE.pattern}")
    if study.backend not in BACKENDS:
        raise ConfigError(f"study field 'backend': {study.backend!r} is not one of {BACKENDS}")
    if study.parallel < 1:
        raise ConfigError(f"study field 'parallel': {study.parallel} must be >= 1")
    if study.max_attempts < 1:
        raise ConfigError(f"study field 'max_attempts': {study.max_attempts} must be >= 1")
    if study.backend == "tpu_pod" and not (study.tpu.name and study.tpu.zone):
        raise ConfigError("study fields 'tpu.name' and 'tpu.zone' are needed by the tpu_pod "
                          "backend")


def expand_runs(study: ml_collections.ConfigDict) -> list[Run]:
    """Every (variant, seed) run with its resolved config, variants in the study's order."""
    check_study(study)
    common = apply_overrides(study.base, study.overrides, "study field 'overrides'")
    runs = []
    for variant, fields in study.variants.items():
        cfg = apply_overrides(common, fields, f"variant {variant!r}")
        for seed in study.seeds:
            name = f"{variant}-s{seed}"
            run_cfg = ml_collections.ConfigDict(cfg.to_dict())
            run_cfg.train.seed = seed
            run_cfg.name = f"{study.name}/{name}"
            runs.append(Run(name, variant, seed, run_cfg))
    return runs


def config_from_file(path: str | Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (``configs/*.py``), as absl's ``config_flags`` loads
    one; lets a study build on an existing experiment config."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_hash(cfg: ml_collections.ConfigDict) -> str:
    """Stable digest of a resolved config (what makes a finished run reusable)."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
