"""launch/convert.py end to end as a real process: what it writes, and its errors for bad paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import cpmjax
from tests.conftest import tiny_hf_config
from tests.convert.hf_fixtures import hf_tensors, write_hf_folder

ROOT = Path(__file__).resolve().parents[2]


def _convert(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    hf_cfg = tiny_hf_config()
    return write_hf_folder(tmp_path_factory.mktemp("src") / "ckpt", hf_cfg, hf_tensors(hf_cfg),
                           shards=2)


def test_converts_to_sharded_bf16_llama_then_refuses_to_overwrite(src, tmp_path):
    dst = tmp_path / "llama"
    done = _convert(f"--src={src}", f"--dst={dst}", "--format=llama", "--dtype=bfloat16",
                    "--max_shard_size=20KB")
    assert done.returncode == 0, done.stderr
    assert f"wrote llama checkpoint to {dst}" in done.stdout
    assert "model.safetensors.index.json" in done.stdout and "config.json" in done.stdout
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    toks = np.arange(12)[None] % 97
    ours, theirs = cpmjax.load(src).logits(toks), cpmjax.load(dst).logits(toks)
    assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() < 0.1  # bf16 weights

    again = _convert(f"--src={src}", f"--dst={dst}", "--format=hf")
    assert again.returncode == 1
    assert f"{dst} exists and is not empty" in again.stderr
    assert json.loads((dst / "config.json").read_text()) == config  # untouched


def test_hf_to_cpmjax_checkpoint_and_back_is_bit_exact(src, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    done = _convert(f"--src={src}", f"--dst={ckpt}", "--format=cpmjax")
    assert done.returncode == 0, done.stderr
    assert (ckpt / "params").is_dir()
    done = _convert(f"--src={ckpt}", f"--dst={back}", "--format=hf")
    assert done.returncode == 0, done.stderr
    before = {k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    after = load_file(str(back / "model.safetensors"))
    assert set(after) == set(before)
    assert all(np.array_equal(after[k], v) for k, v in before.items())


def test_missing_src_is_named(tmp_path):
    done = _convert(f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'out'}")
    assert done.returncode == 1
    assert f"no checkpoint at {tmp_path / 'nope'}" in done.stderr
    assert not (tmp_path / "out").exists()
