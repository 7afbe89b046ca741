"""cpmjax.experiments.indicator: worked solutions for every family, the conditional loss counts
exactly the target tokens, answers are read from the generated line, and the sigmoid fit and its
comparison of predictors."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from cpmjax.config import ModelConfig
from cpmjax.data.tokenizer import BOS_ID, get_or_build_default_tokenizer, load_tokenizer
from cpmjax.experiments import indicator
from cpmjax.model import forward, init_params
from cpmjax.posttrain import tasks
from tests.experiments.helpers import CACHE, micro_model


def test_every_family_gets_a_worked_solution_that_ends_in_its_answer():
    for ex in tasks.generate("heldout", 70, seed=3):
        text = indicator.question_text(ex) + indicator.target_text(ex, with_solution=True)
        q, s, a = text.splitlines()
        assert q.startswith("Q: ") and s.startswith("S: ") and a == f"A: {ex['answer']}"
        if ex["family"] in ("arithmetic", "lookup", "sort", "reverse", "copy"):
            assert s.endswith(ex["answer"])


def test_indicator_is_the_mean_nll_of_the_target_tokens():
    tok = load_tokenizer(get_or_build_default_tokenizer(str(CACHE), 4096))
    cfg = ModelConfig.from_hf_config(micro_model())
    params = init_params(cfg, jax.random.PRNGKey(0))
    examples = tasks.generate("heldout", 3, seed=0)
    got = indicator.indicator_loss(cfg, params, tok, examples, with_solution=False, batch=2)
    nll, count = 0.0, 0
    for ex in examples:
        q = [BOS_ID] + tok.encode(indicator.question_text(ex)).ids
        t = tok.encode(indicator.target_text(ex, False)).ids
        logits = forward(params, cfg, np.asarray([q + t], np.int32)).logits[0]
        logp = jax.nn.log_softmax(logits, -1)
        nll -= sum(float(logp[len(q) - 1 + i, t[i]]) for i in range(len(t)))
        count += len(t)
    assert got == pytest.approx(nll / count, rel=1e-5)
    with_solution = indicator.indicator_loss(cfg, params, tok, examples, with_solution=True)
    assert math.isfinite(with_solution) and with_solution != got


def test_answers_are_read_from_the_answer_line():
    assert indicator._answer_line(" 23 + 58 = 81\nA: 81\nQ: next", True) == " 81"
    assert indicator._answer_line(" nothing", True) == ""
    assert indicator._answer_line(" 81\nQ:", False) == " 81"


def test_sigmoid_fit_and_predictor_comparison(tmp_path):
    x = np.linspace(1.0, 4.0, 12)
    acc = 1 / (1 + np.exp(-(-2.5 * x + 6.0)))
    a, b = indicator.fit_sigmoid(x, acc)
    assert a == pytest.approx(-2.5, rel=1e-3) and b == pytest.approx(6.0, rel=1e-3)
    rng = np.random.default_rng(0)
    points = [{"indicator": float(xi), "final_eval_loss": float(rng.uniform(5, 6)),
               "accuracy": float(ai)} for xi, ai in zip(x, acc)]
    points.append({"indicator": 2.0, "final_eval_loss": None, "accuracy": 0.1})  # skipped
    res = indicator.write_predictor_report(points, tmp_path / "fit", "cmd")
    assert res["models"] == 12
    assert res["indicator"]["spearman"] == pytest.approx(-1.0)
    assert res["indicator"]["loo_rmse"] < 0.01 < res["heldout_lm_loss"]["loo_rmse"]
    assert (tmp_path / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| indicator | -1.000 |" in (tmp_path / "fit.md").read_text()
    with pytest.raises(ValueError, match="at least 4"):
        indicator.compare_predictors(points[:3])


def test_study_points_reads_finished_runs(tmp_path):
    import json

    for i, (ind, acc) in enumerate(((1.5, 0.4), (2.5, None), (None, None))):
        run = tmp_path / "s" / "runs" / f"r{i}"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"config_hash": "h", "config": {}}))
        result = {"name": f"r{i}", "config_hash": "h", "final_eval_loss": 5.0 + i}
        result.update({k: v for k, v in (("indicator", ind), ("accuracy", acc)) if v})
        if i < 2:  # r2 is unfinished (no result.json)
            (run / "result.json").write_text(json.dumps(result))
    pts = indicator.study_points([tmp_path / "s"])
    assert [(p["run"], p["indicator"], p["accuracy"]) for p in pts] == [
        ("r0", 1.5, 0.4), ("r1", 2.5, None)]
