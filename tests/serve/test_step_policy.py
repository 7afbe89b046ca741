"""The step-kind policy probes every kind, then runs the one with the most measured tokens per
second for the batch-size bucket, and re-tries the others now and then."""

from __future__ import annotations

import pytest

from cpmjax.serve.step_policy import StepCostPolicy


def _run(policy, busy, steps, cost):
    """Drive ``policy``: kind k's step takes cost[k] = (seconds, tokens)."""
    picks = []
    for _ in range(steps):
        k = policy.choose(busy)
        policy.record(k, busy, *cost[k])
        picks.append(k)
    return picks


def test_probes_then_picks_the_fastest_per_batch_bucket():
    policy = StepCostPolicy(3, probes=2, retry_every=50)
    # batch 1: kind 0 (tree) gives 3 tokens in 2 ms, kind 2 (plain) 1 token in 1 ms
    small = {0: (0.002, 3), 1: (0.0015, 2), 2: (0.001, 1)}
    picks = _run(policy, 1, 40, small)
    assert picks[:6] == [0, 0, 1, 1, 2, 2]
    assert set(picks[6:]) == {0}
    # batch 8 (its own bucket): verification is costly, plain wins
    big = {0: (0.02, 8 * 3), 1: (0.012, 8 * 2), 2: (0.004, 8)}
    picks = _run(policy, 8, 40, big)
    assert set(picks[6:]) == {2}
    assert policy.rate(2, 8) == pytest.approx(2000.0)
    assert policy.rate(0, 1) == pytest.approx(1500.0)


def test_retries_see_a_cost_that_changed():
    policy = StepCostPolicy(2, probes=1, window=4, retry_every=8)
    _run(policy, 1, 20, {0: (0.001, 1), 1: (0.004, 2)})  # kind 0 wins
    picks = _run(policy, 1, 60, {0: (0.001, 1), 1: (0.001, 3)})  # kind 1 became cheap
    assert picks[-10:].count(1) >= 9  # one retry of kind 0 may fall among them


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=">= 1"):
        StepCostPolicy(0)
