"""The loop's stop rules: the non-finite skip budget (consecutive and fraction of a window), end
to end with a real trainer whose every update overflows."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from cpmjax.train.experiment import experiment_config
from cpmjax.train.loop import NonFiniteError, SkipBudget
from tests.conftest import tiny_hf_config
from tests.train import runs


def _budget(**train) -> SkipBudget:
    cfg = experiment_config(tiny_hf_config(), "t")
    cfg.train.update(train)
    return SkipBudget(cfg.train)


def _feed(budget: SkipBudget, pattern: str, settle_every: int = 3) -> None:
    """'.' a finite step, 'x' a skipped one."""
    for i, c in enumerate(pattern, 1):
        budget.add(i, jnp.asarray(c == "."))
        if i % settle_every == 0:
            budget.settle()
    budget.settle()


def test_consecutive_skips_stop_at_the_limit() -> None:
    _feed(_budget(nonfinite_max_consecutive=3), "xx.xx.xx.")  # never 3 in a row
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(4-6\).*"
                                             "train.nonfinite_max_consecutive=3"):
        _feed(_budget(nonfinite_max_consecutive=3), "...xxxx.")


def test_skips_above_the_window_fraction_stop() -> None:
    spread = "x." * 10  # 10 of 20 skipped, never two in a row
    _feed(_budget(nonfinite_max_fraction=0.5, nonfinite_window=20), spread)
    with pytest.raises(NonFiniteError, match=r"6 of the last 10 steps \(up to step 17\).*"
                                             "nonfinite_max_fraction=0.5"):
        _feed(_budget(nonfinite_max_fraction=0.5, nonfinite_window=10), "....." + "x." * 5 + "xx")
    # the window slides: old skips stop counting
    _feed(_budget(nonfinite_max_fraction=0.1, nonfinite_window=10), "x" + "." * 9 + "x" + "." * 9)


def test_a_run_whose_updates_all_overflow_stops_nonzero(train_data, jax_cache, tmp_path) -> None:
    """lr=1e30: every step after the first is non-finite and skipped; the budget stops the run
    (it used to exit 0 after skipping every step)."""
    work = tmp_path / "run"
    done = runs.train(train_data, jax_cache, work, "--config.train.lr=1e30",
                      "--config.train.warmup_steps=0")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "train: error: non-finite loss or gradient in 5 consecutive steps (2-6), the limit of "
        "train.nonfinite_max_consecutive=5; stopping")
    assert max(runs.by_step(work)) == 6
