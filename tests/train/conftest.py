"""Train-test fixtures shared by the fault, run-dir and export tests: the small corpus, the
session's JAX compilation cache, and one uninterrupted reference run that the others compare
their losses with (bit for bit) or copy and damage."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train import runs


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runs.write_corpus(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def reference_run(train_data: Path, jax_cache: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 steps, a checkpoint every 2 (all kept), never interrupted."""
    work = tmp_path_factory.mktemp("reference") / "run"
    done = runs.train(train_data, jax_cache, work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(runs.by_step(work)) == list(range(1, runs.STEPS + 1))
    return work
