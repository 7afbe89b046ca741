"""Post-training fixtures: the project tokenizer (4096 tokens, in the repo's .cache, built once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpmjax.data.tokenizer import get_or_build_default_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def project_tokenizer() -> Path:
    return get_or_build_default_tokenizer(ROOT / ".cache" / "cpmjax", 4096)
