"""Data-test fixtures: the default corpus and tokenizer, built once per session in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpmjax.data import build_default_corpus, get_or_build_default_tokenizer


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def corpus_dir(data_cache: Path) -> Path:
    return build_default_corpus(data_cache)


@pytest.fixture(scope="session")
def tokenizer_dir(data_cache: Path, corpus_dir: Path) -> Path:
    return get_or_build_default_tokenizer(data_cache, vocab_size=1024)
