"""Trajectories, groups and the rollout state: JSON round trip, staleness, prompt order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpmjax.rl.buffer import (Group, RolloutState, Trajectory, enforce_staleness,
                              prompt_order)


def _state() -> RolloutState:
    s = RolloutState(version=5, prompts_drawn=3, next_group_id=3)
    old = Trajectory([1, 2])
    old.extend([7, 8], [np.float32(-0.1234567).item(), -2.5], version=1)
    old.extend([9], [-0.75], version=3)
    fresh = Trajectory([1, 2])
    fresh.extend([4], [-1.0], version=4)
    fresh.finish = "stop"
    s.in_flight = [Group(0, 7, [old, fresh])]
    done = Trajectory([5], [6, 2], [-0.5, -0.25], [2, 2], "stop", 1)
    s.ready = [Group(1, 4, [done, Trajectory([5], [2], [-0.1], [4], "stop", 1)], [1.0, 0.0])]
    s.count("generated_tokens", 6)
    return s


def test_json_round_trip_is_exact():
    s = _state()
    back = RolloutState.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s
    assert back.in_flight[0].members[0].versions == [1, 1, 3]
    assert back.in_flight[0].members[0].logprobs[0] == np.float32(-0.1234567)


def test_staleness_restart_and_drop():
    s = _state()
    enforce_staleness(s, max_staleness=3, policy="restart")
    # the in-flight group's first member has version-1 tokens (lag 4 > 3): restarted
    old, fresh = s.in_flight[0].members
    assert old.response == [] and old.restarts == 1 and not old.done
    assert fresh.response == [4]  # lag 1: kept
    # the ready group lags 3: kept ready
    assert [g.id for g in s.ready] == [1]
    assert s.counters["stale_restarted"] == 1

    s = _state()
    enforce_staleness(s, max_staleness=2, policy="restart")
    assert [g.id for g in s.ready] == [] and sorted(g.id for g in s.in_flight) == [0, 1]
    assert s.in_flight[1].rewards is None  # scored again once its restarted member is done

    s = _state()
    enforce_staleness(s, max_staleness=2, policy="drop")
    assert s.in_flight == [] and s.ready == [] and s.counters["stale_dropped"] == 2
    with pytest.raises(ValueError, match="stale policy"):
        enforce_staleness(s, 2, "keep")


def test_prompt_order_is_a_permutation_per_pass():
    n = 7
    first = [prompt_order(n, i, seed=3) for i in range(n)]
    second = [prompt_order(n, i, seed=3) for i in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second  # each pass reshuffled
    assert first == [prompt_order(n, i, seed=3) for i in range(n)]


def test_extend_checks_lengths():
    with pytest.raises(ValueError, match="log-probabilities"):
        Trajectory([1]).extend([2, 3], [-1.0], version=0)
