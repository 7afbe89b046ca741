"""FR-Spec vocabulary: frequency ranking, EOS forced in, file round trip, bad inputs named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpmjax.serve.frspec import coverage, load_frspec, save_frspec, token_counts, top_tokens


def test_top_tokens_ranks_by_frequency_and_forces_eos(tmp_path):
    docs = [[5, 5, 5, 7, 7, 1], [5, 9, 7, 3, 3, 3, 3]]
    counts = token_counts(docs, 12)
    assert counts.tolist() == [0, 1, 0, 4, 0, 4, 0, 3, 0, 1, 0, 0]
    assert top_tokens(counts, 3).tolist() == [3, 5, 7]  # 3 and 5 tie at 4: smaller id first
    ids = top_tokens(counts, 3, force=[2])  # eos never occurs but must be proposable
    assert ids.tolist() == [3, 5, 2]
    assert coverage(counts, ids) == pytest.approx(8 / 13)
    save_frspec(ids, tmp_path / "f.npy", {"coverage": coverage(counts, ids)})
    assert load_frspec(tmp_path / "f.npy", 12).tolist() == [3, 5, 2]
    assert json.loads((tmp_path / "f.json").read_text())["size"] == 3


def test_bad_frspec_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="out of"):
        token_counts([[1, 12]], 12)
    with pytest.raises(ValueError, match="FR-Spec size"):
        top_tokens(np.ones(4), 5)
    np.save(tmp_path / "dup.npy", np.array([1, 1]))
    with pytest.raises(ValueError, match="distinct"):
        load_frspec(tmp_path / "dup.npy", 12)
