"""check_experiment: the whole experiment config validated before anything is compiled or
written; each error names section.field and the rule."""

from __future__ import annotations

import math
import os
import subprocess

import pytest

from cpmjax.config import ConfigError
from cpmjax.train.experiment import check_experiment, experiment_config
from tests.conftest import tiny_hf_config
from tests.train import runs

BAD = [
    ("train.seq_len", 512, "'train.seq_len': 512 exceeds model.max_position_embeddings \\(256\\)"),
    ("data.weights", "1,2", "'data.weights': mixture weights need data.train_files"),
    ("train.compute_dtype", "float7", "'train.compute_dtype': must be one of float32, bfloat16, "
                                      "float16 \\(got 'float7'\\)"),
    ("train.steps", True, "'train.steps': must be an integer >= 1 \\(got True\\)"),
    ("train.lr", math.nan, "'train.lr': must be a finite number > 0"),
    ("train.b2", 1.0, "'train.b2': must be in \\[0, 1\\)"),
    ("train.schedule", "linear", "'train.schedule': must be one of wsd, cosine, constant"),
    ("train.remat", "some", "'train.remat': must be one of"),
    ("train.nonfinite_max_fraction", 1.5, "'train.nonfinite_max_fraction': must be in \\[0, 1\\]"),
    ("mesh.fsdp", 0, "'mesh.fsdp': must be an integer >= 1, or -1"),
    ("checkpoint.keep", 0, "'checkpoint.keep': must be an integer >= 1"),
    ("data.source_type", "csv", "'data.source_type': must be one of jsonl, text, arrayrecord"),
    ("data.train_files", "missing.jsonl", "'data.train_files': missing.jsonl does not exist"),
    ("data.tokenizer", "/nonexistent/tok", "'data.tokenizer': no tokenizer.json at"),
    ("train.draft_form", "medusa", "'train.draft_form': must be one of mtp, cpmcu"),
    ("data.instruct_families", "copy,poem", "'data.instruct_families': must be comma-separated "
                                            "names of copy, "),
    ("model.hidden_size", 66, "'model.hidden_size': must be divisible by num_attention_heads"),
    ("name", "", "'name': must be a non-empty string"),
]


@pytest.mark.parametrize("field,value,match", BAD, ids=[b[0] for b in BAD])
def test_bad_field_is_named_with_its_rule(field: str, value, match: str) -> None:
    cfg = experiment_config(tiny_hf_config(), "t")
    section, _, key = field.rpartition(".")
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(ConfigError, match=f"config field {match}"):
        check_experiment(cfg)


def test_weights_are_checked_against_the_files(tmp_path) -> None:
    cfg = experiment_config(tiny_hf_config(), "t")
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("{}\n")
    cfg.data.train_files = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"
    assert check_experiment(cfg).hidden_size == 64  # valid as it stands
    for weights, match in [("1", "1 weights for 2 train files"), ("1,x", "comma-separated"),
                           ("1,-2", "finite number > 0")]:
        cfg.data.weights = weights
        with pytest.raises(ConfigError, match=f"'data.weights': .*{match}"):
            check_experiment(cfg)


def test_launch_refuses_a_bad_field_in_one_line_writing_nothing(train_data, tmp_path) -> None:
    work = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(runs.ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(runs.train_args(work, "--config.train.compute_dtype=float7"),
                          cwd=train_data, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "train: error: config field 'train.compute_dtype': must be one of float32, bfloat16, "
        "float16 (got 'float7')"]
    assert not work.exists()
