"""The step-kind policy probes every kind, then runs the one whose slowest busy row progresses
fastest for the batch-size bucket, and re-tries the others at doubling intervals."""

from __future__ import annotations

import pytest

from cpmjax.serve.step_policy import StepCostPolicy


def _run(policy, busy, steps, cost):
    """Drive ``policy``: kind k's step takes cost[k] = (seconds, slowest row's tokens)."""
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
    big = {0: (0.02, 3), 1: (0.012, 2), 2: (0.004, 1)}
    picks = _run(policy, 8, 40, big)
    assert set(picks[6:]) == {2}
    assert policy.rate(2, 8) == pytest.approx(2000.0)
    assert policy.rate(0, 1) == pytest.approx(1500.0)


def test_the_pace_is_the_slowest_rows():
    """At batch 8 a round whose mean row gains 2.5 tokens in 2x a plain step's time would raise
    throughput, but its slowest row (1 token) falls behind plain decoding: plain is chosen."""
    policy = StepCostPolicy(2, probes=2)
    picks = _run(policy, 8, 30, {0: (0.002, 1), 1: (0.001, 1)})
    assert set(picks[4:]) == {1}
    assert policy.rate(0, 8) == pytest.approx(4000.0)  # 8 rows x 1 token / 2 ms


def test_retries_see_a_cost_that_changed():
    policy = StepCostPolicy(2, probes=1, window=4, retry_every=8, max_retry_every=16)
    _run(policy, 1, 20, {0: (0.001, 1), 1: (0.004, 2)})  # kind 0 wins
    picks = _run(policy, 1, 100, {0: (0.001, 1), 1: (0.001, 3)})  # kind 1 became cheap
    assert picks[-10:].count(1) >= 9  # one retry of kind 0 may fall among them


def test_a_retry_drops_the_kinds_stale_tokens_and_keeps_its_costs():
    """Kind 1 (a chain: 2 ms a round) drew 3 tokens a round, then 1 on a hard request, where
    plain (kind 0, 1 ms) took over; on the next request it draws 3 again: the first re-try
    measures its tokens afresh (not averaged with the hard request's) and it runs from then
    on. Its seconds window is kept: a re-try is the probe steps only."""
    policy = StepCostPolicy(2, probes=1, window=16, retry_every=8, budget=None)
    _run(policy, 1, 20, {0: (0.001, 1), 1: (0.002, 3)})  # kind 1 fills its window
    _run(policy, 1, 40, {0: (0.001, 1), 1: (0.002, 1)})  # a hard request: kind 0 wins
    assert policy.rate(0, 1) > policy.rate(1, 1)
    picks = _run(policy, 1, 60, {0: (0.001, 1), 1: (0.002, 3)})
    first = picks.index(1)
    assert first <= 32  # the next re-try (intervals 8, 16, 32 while plain led)
    assert picks[first:].count(0) <= 3  # re-tries of kind 0 only
    assert len(policy._seconds[1, 1]) == 16  # its costs kept their window


def test_retries_back_off_while_the_choice_holds():
    policy = StepCostPolicy(2, probes=1, retry_every=8, max_retry_every=64, budget=None)
    picks = _run(policy, 1, 400, {0: (0.001, 1), 1: (0.004, 2)})
    retries = [i for i, k in enumerate(picks) if k == 1][1:]  # after the probe
    gaps = [b - a for a, b in zip(retries, retries[1:])]
    assert gaps[:4] == [16, 32, 64, 64]  # doubling from 8, capped at 64
    assert len(retries) < 12


def test_a_close_contender_keeps_the_base_retry_interval():
    policy = StepCostPolicy(2, probes=1, retry_every=8, max_retry_every=64, budget=None)
    picks = _run(policy, 1, 200, {0: (0.001, 1), 1: (0.0011, 1)})  # kind 0 leads by 10%
    retries = [i for i, k in enumerate(picks) if k == 1][1:]
    assert {b - a for a, b in zip(retries, retries[1:])} == {8}


def test_paired_tokens_count_for_the_kind_they_describe():
    """The chain's two probe rounds drew 1 token each (a hard stretch), while the tree rounds
    showed the chain drawing 4 on the same rows: with those paired tokens the chain's pace is
    their mean with its own over its own measured seconds, and it takes over; without them
    the two unlucky probes keep the tree until a re-try."""
    picks = {}
    for paired in (True, False):
        policy = StepCostPolicy(2, probes=2, retry_every=1000, max_retry_every=1000)
        picks[paired] = []
        for _ in range(12):
            k = policy.choose(1)
            picks[paired].append(k)
            if k == 0:  # tree: 3 tokens in 2 ms; its first children hold 4 correct drafts
                policy.record(0, 1, 0.002, 3, paired={1: 4} if paired else None)
            else:  # chain: 1.5 ms a round; its probes drew 1 token each, later rounds 4
                policy.record(1, 1, 0.0015, 1 if picks[paired].count(1) <= 2 else 4)
        assert picks[paired][:4] == [0, 0, 1, 1]
    assert set(picks[True][4:]) == {1}
    assert set(picks[False][4:]) == {0}
    assert policy.rate(1, 1) == pytest.approx(1 / 0.0015)  # the unpaired policy's view


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=">= 1"):
        StepCostPolicy(0)
    with pytest.raises(ValueError, match="budget must be in"):
        StepCostPolicy(2, budget=0.0)
    with pytest.raises(ValueError, match="max_retry_every must be >= retry_every"):
        StepCostPolicy(2, retry_every=64, max_retry_every=32)


def test_retries_of_a_costly_kind_stay_within_the_exploration_budget():
    """Plain (kind 2) wins; a tree round (kind 0) costs 4 plain steps and a chain (kind 1) 2, as
    at batch 8 on this CPU: the re-tries' extra time stays within the 1% budget, over a bench's
    first 500 steps (where the doubling intervals alone spent 2.8%) and over 3000, while both
    kinds are still re-tried."""
    cost = {0: (0.004, 1), 1: (0.002, 1), 2: (0.001, 1)}

    def overhead(budget, steps):
        policy = StepCostPolicy(3, probes=2, retry_every=64, max_retry_every=512, budget=budget)
        picks = _run(policy, 8, steps, cost)[9:]  # after the first probes
        extra = sum(cost[k][0] - cost[2][0] for k in picks)
        return extra / sum(cost[k][0] for k in picks), picks

    assert overhead(None, 500)[0] > 0.02
    assert overhead(0.01, 500)[0] <= 0.01
    spent, picks = overhead(0.01, 3000)
    assert spent <= 0.01 and picks.count(0) >= 2 and picks.count(1) >= 2


def test_the_budget_spaces_each_kinds_retries_by_its_own_cost():
    policy = StepCostPolicy(3, probes=1, retry_every=8, max_retry_every=64, budget=0.1)
    picks = _run(policy, 8, 600, {0: (0.011, 1), 1: (0.0015, 1), 2: (0.001, 1)})
    # before a re-try of kind 0: (1 + 1) x 10 ms extra / (0.1 x 1 ms) = 200 steps; before one
    # of kind 1 (cheap): the doubling interval
    starts = [i for i in range(4, len(picks)) if picks[i] != 2 and picks[i - 1] == 2]
    gaps = {(picks[i], picks[j]): j - i for i, j in zip(starts, starts[1:])}
    assert gaps[(1, 0)] >= 200
    assert gaps[(0, 1)] < 200


def test_the_budget_spares_a_close_contender():
    """Plain was chosen (its pace 1000/s) over a chain whose round costs 2.4 plain steps for 2
    tokens (pace 833/s): within LEAD, so the chain keeps the base re-try interval however much
    its re-tries cost in seconds, as at batch 1 where noisy probes can mislead the choice."""
    policy = StepCostPolicy(2, probes=1, retry_every=8, max_retry_every=64, budget=0.01)
    picks = _run(policy, 1, 200, {0: (0.001, 1), 1: (0.0024, 2)})
    retries = [i for i, k in enumerate(picks) if k == 1][1:]
    assert {b - a for a, b in zip(retries, retries[1:])} == {8}
