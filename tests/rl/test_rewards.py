"""Verifiable rewards on the instruction set and DAPO's soft overlong penalty."""

from __future__ import annotations

import pytest

from cpmjax.posttrain import tasks
from cpmjax.rl.rewards import soft_overlong_penalty, verifiable_reward


def _example(family: str):
    return next(ex for ex in tasks.generate("train", 20, seed=1) if ex["family"] == family)


def test_verifiable_reward():
    ex = _example("sort")
    right = ex["answer"] + "<|im_end|>"
    assert verifiable_reward(ex, right) == 1.0
    assert verifiable_reward(ex, "<think>\nsorting\n</think>\n" + right) == 1.0
    wrong = " ".join(reversed(ex["answer"].split())) + "<|im_end|>"
    if wrong != right:
        assert verifiable_reward(ex, wrong) == 0.0
        assert verifiable_reward(ex, wrong, format_credit=0.1) == 0.1
    # malformed: no partial credit whatever format_credit says
    assert verifiable_reward(ex, "The answer is " + right, format_credit=0.1) == 0.0


def test_numeric_tolerance():
    ex = _example("convert")
    value = float(ex["answer"])
    assert verifiable_reward(ex, repr(value * (1 + 1e-9))) == 1.0
    assert verifiable_reward(ex, repr(value * 1.01 + 1)) == 0.0


def test_soft_overlong_penalty():
    # DAPO eq. 13 with L_max = 20, L_cache = 4
    assert soft_overlong_penalty(16, 20, 4) == 0.0
    assert soft_overlong_penalty(18, 20, 4) == pytest.approx(-0.5)
    assert soft_overlong_penalty(20, 20, 4) == pytest.approx(-1.0)
    assert soft_overlong_penalty(25, 20, 4) == -1.0
    with pytest.raises(ValueError, match="overlong buffer"):
        soft_overlong_penalty(5, 20, 0)
