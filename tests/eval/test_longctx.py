"""cpmjax.eval.longctx_tasks / longctx: samples of exact length with the answer at its depth,
the string-match score, and the harness end to end on a tiny random HF checkpoint (cpmjax.load),
dense and sparse on the same weights through the serving engine, with its JSON, table and PNGs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import cpmjax
from cpmjax.config import ModelConfig
from cpmjax.data.tokenizer import BOS_ID, get_or_build_default_tokenizer, load_tokenizer
from cpmjax.eval import longctx
from cpmjax.eval.longctx_tasks import TASKS, Sample, corpus_haystack, make_sample, score
from cpmjax.model import init_params
from tests.experiments.helpers import CACHE, micro_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(get_or_build_default_tokenizer(str(CACHE), 4096))


@pytest.fixture(scope="module")
def haystack(tok):
    return corpus_haystack(tok, str(CACHE), 2048)


@pytest.mark.parametrize("task", TASKS)
def test_samples_have_their_length_and_the_answer_at_its_depth(task, tok, haystack):
    for length, depth in ((512, 0.0), (1024, 0.5), (2048, 1.0)):
        s = make_sample(task, tok, haystack, length, depth, index=3, seed=1)
        assert len(s.tokens) == length and s.tokens[0] == BOS_ID
        text = tok.decode(s.tokens)
        assert all(a in text for a in s.answers)
        first = f"VAR {s.answers[0]} = " if task == "variable_tracking" else s.answers[0]
        at = text.find(first) / len(text)
        # the answer's needle (the chain's first assignment) sits at its depth of the filler
        # (the question after it is ~1/8 of a 512-token prompt)
        assert abs(at - depth * (1 - 0.12 * 512 / length)) < 0.12, (task, length, depth, at)
        again = make_sample(task, tok, haystack, length, depth, index=3, seed=1)
        assert again == s  # a function of (task, length, depth, index, seed)
    with pytest.raises(ValueError, match="depth"):
        make_sample(task, tok, haystack, 512, 1.5, 0)
    with pytest.raises(ValueError, match="no room"):
        make_sample(task, tok, haystack, 40, 0.5, 0)


def test_score_is_the_fraction_of_answers_found_as_words():
    s = Sample("niah_multivalue", 10, 0.5, [1], ("123456", "654321"), 8)
    assert score(s, " 123456, 654321.") == 1.0
    assert score(s, " 123456 and 9654321") == 0.5  # no match inside a longer number
    assert score(s, "nothing") == 0.0


def test_harness_dense_and_sparse_on_an_hf_checkpoint(tmp_path, tok):
    cfg = ModelConfig.from_hf_config({**micro_model(), "max_position_embeddings": 160})
    cpmjax.save_hf(cpmjax.api.Model(cfg, init_params(cfg, jax.random.PRNGKey(0))), tmp_path / "hf")
    model = cpmjax.load(tmp_path / "hf")
    sparse = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
              "window_size": 32, "topk": 2, "use_nope": False, "dense_len": 0}
    result = longctx.evaluate(model, tasks=("niah_single", "variable_tracking"),
                              lengths=(128, 1024), depths=(0.0, 1.0), samples=2, sparse=sparse,
                              tokenizer=tok, cache_dir=str(CACHE), max_slots=4)
    assert result["lengths"] == [128] and result["dropped_lengths"] == [1024]  # context 160
    assert result["sparse_config"]["topk"] == 2
    cells = result["cells"]
    assert len(cells) == 2 * 2 * 2  # modes x tasks x depths at one length
    assert all(c["samples"] == 2 and 0.0 <= c["score"] <= 1.0 for c in cells)
    out = longctx.write_outputs(result, tmp_path / "res", "tiny", "python launch/longctx_eval.py")
    saved = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert saved["cells"] == cells and saved["command"].startswith("python launch/")
    md = (tmp_path / "res" / "tiny.md").read_text()
    assert "| niah_single | 128 |" in md and "| task | length | dense | sparse |" in md
    assert len(out["plots"]) == 2
    assert all(open(p, "rb").read(8) == PNG for p in out["plots"])
    with pytest.raises(ValueError, match="fits the checkpoint's context"):
        longctx.evaluate(model, lengths=(4096,), tokenizer=tok, cache_dir=str(CACHE))
    with pytest.raises(ValueError, match="mode"):
        longctx.evaluate(model, modes=("fast",), tokenizer=tok, cache_dir=str(CACHE))


def test_sparse_variant_uses_the_given_then_own_then_minicpm4_config():
    cfg = ModelConfig.from_hf_config(micro_model())
    assert longctx.sparse_variant(cfg, None).sparse_config.window_size == 2048  # MiniCPM4's
    own = longctx.sparse_variant(cfg, {"topk": 3, "window_size": 128, "block_size": 64,
                                       "kernel_size": 32, "kernel_stride": 16})
    assert longctx.sparse_variant(own, None).sparse_config.topk == 3
    assert longctx.dense_variant(own).sparse_config is None
    with pytest.raises(ValueError, match="window_size"):
        longctx.sparse_variant(cfg, {"window_size": 100})
    assert np.isfinite(cfg.width_multiplier)
