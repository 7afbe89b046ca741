"""cpmjax.experiments.verify_data: the verification study anneals the pre-trained run's weights
on its default mix and on 70/30 default/candidate, evaluated on the default held-out split."""

from __future__ import annotations

import json

import pytest

from cpmjax.config import ConfigError
from cpmjax.experiments.study import expand_runs
from cpmjax.experiments.verify_data import candidate_sets, verification_study
from cpmjax.train.experiment import experiment_config
from tests.experiments.helpers import CACHE, micro_model


def _pretrained(tmp_path, **data):
    cfg = experiment_config(micro_model(), "pre")
    cfg.data.cache_dir = str(CACHE)
    cfg.data.update(data)
    run = tmp_path / "pre"
    run.mkdir()
    (run / "experiment.json").write_text(cfg.to_json())
    return run


def test_verification_study_mixes_30_percent_candidate_into_the_default_mix(tmp_path):
    a, b, cand = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "cand.jsonl"))
    for f in (a, b, cand):
        f.write_text(json.dumps({"text": "x"}) + "\n")
    run = _pretrained(tmp_path, train_files=f"{a},{b}", weights="3,1", valid_file=str(b))
    study = verification_study(run, {"candidate": [str(cand)], "two": [str(cand), str(a)]},
                               steps=40, seeds=(0, 1))
    runs = {r.name: r.config for r in expand_runs(study)}
    assert sorted(runs) == ["candidate-s0", "candidate-s1", "default-s0", "default-s1",
                            "two-s0", "two-s1"]
    default, mixed = runs["default-s0"].data, runs["candidate-s0"].data
    assert default.train_files == f"{a},{b}" and default.weights == "3,1"
    assert mixed.train_files == f"{a},{b},{cand}" and mixed.weights == "0.525,0.175,0.3"
    assert runs["two-s0"].data.weights == "0.525,0.175,0.15,0.15"
    assert default.valid_file == mixed.valid_file == str(b)
    t = runs["candidate-s1"].train
    assert t.init_from == str(run.absolute()) and t.steps == 40 and t.decay_fraction == 1.0
    assert study.indicator.enabled
    # the default corpus when the run trained on it
    (tmp_path / "p2").mkdir()
    plain = verification_study(_pretrained(tmp_path / "p2"), {"c": [str(cand)]})
    assert expand_runs(plain)[0].config.data.train_files.endswith("corpus/train.jsonl")
    # a run trained before a field existed: the field takes this checkout's default
    old = json.loads((run / "experiment.json").read_text())
    del old["train"]["init_from"], old["data"]["cache_dir"]
    (run / "experiment.json").write_text(json.dumps(old))
    cfg = expand_runs(verification_study(run, {"c": [str(cand)]}))[0].config
    assert cfg.data.cache_dir == ".cache/cpmjax" and cfg.train.init_from == str(run.absolute())


def test_verification_refuses_bad_inputs(tmp_path):
    cand = tmp_path / "c.jsonl"
    cand.write_text("{}\n")
    run = _pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verification_study(run, {"c": [str(tmp_path / "missing.jsonl")]})
    with pytest.raises(ConfigError, match="share"):
        verification_study(run, {"c": [str(cand)]}, share=1.0)
    with pytest.raises(ConfigError, match="'default' is the default mix"):
        verification_study(run, {"default": [str(cand)]})
    with pytest.raises(ConfigError, match="at least one candidate set"):
        verification_study(run, {"c": []})
    with pytest.raises(FileNotFoundError, match="not a training run"):
        verification_study(tmp_path, {"c": [str(cand)]})


def test_candidate_sets_are_named_or_take_the_file_stem():
    assert candidate_sets(["raw=a/p.jsonl", "f=b.jsonl+c.jsonl", "d/x.v2.jsonl"]) == {
        "raw": ["a/p.jsonl"], "f": ["b.jsonl", "c.jsonl"], "x_v2": ["d/x.v2.jsonl"]}
    with pytest.raises(ConfigError, match="'raw' is named twice"):
        candidate_sets(["raw=a.jsonl", "raw=b.jsonl"])
