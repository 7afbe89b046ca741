"""The serving launchers' flags: a draft from an EAGLE file end to end through launch/generate.py,
quantized targets, and refusals of flag combinations that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import app, flags

from cpmjax.model.mtp import init_mtp_params, save_mtp
from cpmjax.quant.qforward import is_quantized
from cpmjax.serve import cli
from cpmjax.serve.frspec import save_frspec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def parse():
    """Parse launcher flags in-process (so ``.present`` is set as on a command line), then reset."""
    def run(*argv: str) -> None:
        flags.FLAGS(["launcher", *argv])

    yield run
    flags.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def draft_file(cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("draft") / "draft.safetensors"
    save_mtp(cfg, init_mtp_params(cfg, jax.random.key(1)), path)
    return path


def test_generate_launcher_speculative_end_to_end(draft_file):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "launch/generate.py", "--random_preset=tiny", "--prompt_ids=1,5,6",
           "--max_new_tokens=8"]
    plain = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    spec = subprocess.run(cmd + [f"--draft={draft_file}", "--spec_k=2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr[-2000:]
    assert spec.stdout == plain.stdout  # greedy: token-identical
    assert "mean accept length" in spec.stderr and "k=2" in spec.stderr


def test_draft_flags_build_the_speculative_settings(cfg, parse, draft_file, tmp_path):
    ids = np.arange(cfg.vocab_size)[::-1].astype(np.int32)  # a ranking: most frequent first
    save_frspec(ids, tmp_path / "freq.npy", {"vocab_size": cfg.vocab_size})
    parse(f"--draft={draft_file}", "--spec_k=4", f"--frspec={tmp_path / 'freq.npy'}",
          "--frspec_size=100")
    spec = cli.load_speculative(cfg)
    assert spec.k == 4 and spec.frspec_ids.tolist() == ids[:100].tolist()


@pytest.mark.parametrize("argv, match", [
    (["--spec_k=2"], "only apply with --draft"),
    (["--frspec=x.npy"], "only apply with --draft"),
    (["--draft={draft}", "--spec_k=0"], "--spec_k must be >= 1"),
    (["--draft={draft}", "--frspec_size=10"], "--frspec_size needs --frspec"),
    (["--draft={draft}", "--draft_quantize=rtn"], "full-precision target"),
    (["--draft={draft}", "--frspec={small}", "--frspec_size=99"], r"--frspec_size must be in \[0, 8\]"),
    (["--draft={draft}", "--frspec={alien}"], "FR-Spec ids must be distinct ids in"),
    (["--draft={missing}"], "no such file or training run"),
])
def test_bad_flag_combinations_are_refused(cfg, parse, draft_file, tmp_path, argv, match):
    save_frspec(np.arange(8), tmp_path / "small.npy")
    save_frspec(np.arange(cfg.vocab_size + 10), tmp_path / "alien.npy")  # another vocabulary
    paths = {"draft": draft_file, "small": tmp_path / "small.npy",
             "alien": tmp_path / "alien.npy", "missing": tmp_path / "nope"}
    parse(*[a.format(**paths) for a in argv])
    with pytest.raises((app.UsageError, ValueError, FileNotFoundError), match=match):
        cli.load_speculative(cfg)


def test_quantize_flag_quantizes_the_target_and_allows_a_quantized_draft(cfg, parse,
                                                                         draft_file):
    parse("--random_preset=tiny", "--quantize=rtn", "--quant_bits=8", f"--draft={draft_file}",
          "--draft_quantize=rtn")
    qcfg, qparams, _ = cli.load_model()
    assert is_quantized(qparams) and qparams["layers"]["wq"]["qweight"].dtype == np.int8
    spec = cli.load_speculative(qcfg)
    assert isinstance(spec.draft_params["layer"]["wq"], dict)


def test_generate_launcher_refuses_out_of_range_sampling_flags():
    """issue 11: --top_k=3000000000 crashed with OverflowError inside the engine; now a usage
    error naming the flag, before the model is loaded (other bounds: test_sampling.py)."""
    r = subprocess.run([sys.executable, "launch/generate.py", "--random_preset=tiny",
                        "--prompt_ids=1,5,6", "--top_k=3000000000"], cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "--top_k must be in" in r.stderr, r.stderr[-1500:]
    assert "Traceback" not in r.stderr
