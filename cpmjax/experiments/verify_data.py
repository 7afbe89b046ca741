"""UltraClean's efficient verification of candidate data as an ablation (MiniCPM4 report, arXiv
2506.07900 §2.2.1): anneal a small pre-trained model on a mix of ``share`` candidate data and
``1 - share`` of its default mix (the report: 30% / 70%), next to the same annealing on the default
mix alone, and compare held-out loss (the default mix's held-out split) and the indicator.

Both variants start from the pre-trained run's weights (``train.init_from``), with the same
steps, seeds and a WSD schedule that is all decay (warmup, then the pre-training LR decaying to
``final_lr_ratio`` of it): the decay-stage annealing the report runs on its 1B model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import ml_collections

from cpmjax.config import ConfigError
from cpmjax.data.corpus import build_default_corpus
from cpmjax.experiments.study import study_config
from cpmjax.train.experiment import experiment_config


def pretrained_experiment(run_dir: str | Path) -> ml_collections.ConfigDict:
    """The experiment config a training run was made with (its ``experiment.json``), on top of
    this checkout's defaults, so a run trained before a config field was added still anneals
    (the field takes its default, as a resumed run's missing fields do)."""
    path = Path(run_dir) / "experiment.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no experiment.json); train "
                                "one first (python launch/train.py --config=configs/tiny.py)")
    stored = json.loads(path.read_text())
    cfg = experiment_config(stored.get("model", {}), stored.get("name", "pretrained"))
    _overlay(cfg, stored)
    return cfg


def _overlay(cfg: ml_collections.ConfigDict, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), ml_collections.ConfigDict):
            _overlay(cfg[k], v)
        else:
            cfg[k] = v


def default_mix(cfg: ml_collections.ConfigDict) -> tuple[list[str], list[float], str]:
    """(train files, weights, held-out file) the run trained and evaluated on."""
    d = cfg.data
    if d.train_files:
        files = [f.strip() for f in d.train_files.split(",") if f.strip()]
        weights = [float(w) for w in d.weights.split(",")] if d.weights else [1.0] * len(files)
        return files, weights, d.valid_file or files[0]
    corpus = build_default_corpus(d.cache_dir)
    return [str(corpus / "train.jsonl")], [1.0], str(corpus / "valid.jsonl")


def candidate_sets(specs: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=FILE[+FILE...]`` or ``FILE`` (named after its stem) -> {name: files}."""
    sets: dict[str, list[str]] = {}
    for spec in specs:
        name, _, files = spec.rpartition("=")
        name = name or Path(files).stem.replace(".", "_")
        if name in sets:
            raise ConfigError(f"candidate set {name!r} is named twice")
        sets[name] = files.split("+")
    return sets


def verification_study(pretrained: str | Path, candidates: Mapping[str, Sequence[str]], *,
                       share: float = 0.3, steps: int = 100, seeds: Sequence[int] = (0,),
                       name: str = "verify", indicator_rows: int = 64) -> ml_collections.ConfigDict:
    """The study: variant ``default`` and one variant per named candidate set (``share`` of the
    tokens drawn from the set's files, split evenly between them), e.g. a filtered shard next to
    the unfiltered one it came from."""
    if not candidates or not all(candidates.values()):
        raise ConfigError("verification needs at least one candidate set, each with a file")
    if "default" in candidates:
        raise ConfigError("candidate set name 'default' is the default mix's variant")
    for files in candidates.values():
        for c in files:
            if not Path(c).is_file():
                raise FileNotFoundError(f"candidate data {c} does not exist")
    if not 0.0 < share < 1.0:
        raise ConfigError(f"candidate share {share} must be in (0, 1)")
    base = pretrained_experiment(pretrained)
    files, weights, valid = default_mix(base)
    total = sum(weights)
    base.name = name
    base.train.update(init_from=str(Path(pretrained).absolute()), steps=steps,
                      warmup_steps=max(1, steps // 10), schedule="wsd", decay_fraction=1.0,
                      eval_every=steps)
    base.checkpoint.every = steps
    base.data.valid_file = valid
    fmt = lambda ws: ",".join(f"{w:.6g}" for w in ws)
    variants = {"default": {"data": {"train_files": ",".join(files), "weights": fmt(weights)}}}
    for set_name, cand in candidates.items():
        mixed = [w / total * (1 - share) for w in weights] + [share / len(cand)] * len(cand)
        variants[set_name] = {"data": {"train_files": ",".join(files + list(cand)),
                                       "weights": fmt(mixed)}}
    study = study_config(base, name, seeds=tuple(seeds), variants=variants)
    study.indicator.update(enabled=True, rows=indicator_rows, accuracy=False)
    return study
