"""cpmjax.serve.self_distill: each line is a corpus prompt followed by the target's own
continuation, and greedy lines match the engine's greedy output."""

from __future__ import annotations

import json

import jax
import pytest

from cpmjax.config import ModelConfig
from cpmjax.data.tokenizer import get_or_build_default_tokenizer, load_tokenizer
from cpmjax.model import init_params
from cpmjax.serve.self_distill import write_self_distill_data
from cpmjax.train.checkpoint import save_model
from tests.conftest import tiny_hf_config
from tests.experiments.helpers import CACHE


def test_writes_prompt_plus_continuation_per_line(tmp_path):
    cfg = ModelConfig.from_hf_config(tiny_hf_config(vocab_size=4096, num_hidden_layers=1))
    model = save_model(cfg, init_params(cfg, jax.random.key(0)), tmp_path / "model")
    out = tmp_path / "selfgen.jsonl"
    n, n_tok = write_self_distill_data(str(model), out, prompts=3, prompt_len=8, new_tokens=5,
                                       temperatures=[0.0, 0.8], cache_dir=str(CACHE))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert n == len(lines) == 3 and 0 < n_tok <= 15
    tok = load_tokenizer(str(get_or_build_default_tokenizer(str(CACHE), 4096)))
    for line in lines:
        assert set(line) == {"text"}
        assert len(tok.encode(line["text"], add_special_tokens=False)) >= 8


def test_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one first"):
        write_self_distill_data(str(tmp_path / "none"), tmp_path / "o.jsonl", prompts=1,
                                prompt_len=4, new_tokens=1, temperatures=[0.0],
                                cache_dir=str(CACHE))
    assert not (tmp_path / "o.jsonl").exists()
