"""Train rows from scored groups: token alignment, advantages, overlong filtering, weights."""

from __future__ import annotations

import numpy as np
import pytest

from cpmjax.rl.batch import group_rows, split_updates
from cpmjax.rl.buffer import Group, Trajectory


def _groups():
    a = Trajectory([1, 10, 11], [20, 21, 2], [-0.5, -1.5, -0.25], [3, 4, 4], "stop", 2)
    b = Trajectory([1, 10, 11], [22, 2], [-2.0, -0.75], [4, 4], "stop", 1)
    long = Trajectory([1, 12], list(range(30, 130)), [-1.0] * 100, [4] * 100, "length", 5)
    short = Trajectory([1, 12], [40, 2], [-0.1, -0.2], [4, 4], "stop", 1)
    return [Group(0, 3, [a, b], [1.0, 0.0]), Group(1, 5, [long, short], [0.0, 1.0])]


def test_rows_align_tokens_logprobs_and_advantages():
    out = group_rows(_groups(), version=5, filter_truncated=True)
    assert out["inputs"].shape == (4, 64)  # the 101-token truncated row is not in the loss
    # row 0: prompt [1, 10, 11] + response [20, 21, 2]: targets 1..5, response targets at 2..4
    np.testing.assert_array_equal(out["inputs"][0, :5], [1, 10, 11, 20, 21])
    np.testing.assert_array_equal(out["targets"][0, :5], [10, 11, 20, 21, 2])
    np.testing.assert_array_equal(out["loss_mask"][0, :6], [0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(out["old_logprobs"][0, 2:5], [-0.5, -1.5, -0.25])
    np.testing.assert_array_equal(out["staleness"][0, 2:5], [2, 1, 1])
    np.testing.assert_array_equal(out["segment_ids"][0, :6], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(out["positions"][1, :4], [0, 1, 2, 3])
    assert out["advantages"][0, 2] > 0 > out["advantages"][1, 2]
    assert out["advantages"][0, 1] == 0.0  # prompt targets carry nothing
    # overlong filtering: the truncated row is empty; its group-mate keeps its advantage
    assert out["loss_mask"][2].sum() == 0 and out["segment_ids"][2].sum() == 0
    assert out["advantages"][3, 1] > 0


def test_unfiltered_rows_keep_truncated_responses():
    out = group_rows(_groups(), version=5, filter_truncated=False)
    assert out["inputs"].shape == (4, 128) and out["loss_mask"][2].sum() == 100
    with pytest.raises(ValueError, match="does not fit"):
        group_rows(_groups(), version=5, filter_truncated=False, length=64)


def test_split_updates_weights_each_minibatch():
    out = group_rows(_groups(), version=5, filter_truncated=True)
    parts = split_updates(out, 2, "token")
    assert [len(p["inputs"]) for p in parts] == [2, 2]
    for p in parts:
        assert p["weights"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="minibatches"):
        split_updates(out, 3, "token")
