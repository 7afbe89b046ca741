"""The serving launchers' model loading (``cpmjax.serve.cli``, plain arguments; the flags live in
``launch/model_flags.py``): a draft from an EAGLE file end to end through launch/generate.py,
quantized targets, and refusals of flag combinations that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from cpmjax.model.mtp import init_mtp_params, save_mtp
from cpmjax.quant.qforward import is_quantized
from cpmjax.serve import cli
from cpmjax.serve.frspec import save_frspec

ROOT = Path(__file__).resolve().parents[2]


def draft_source(**kw):
    """A DraftSource as the launcher flags give it: ``given`` holds the names set explicitly."""
    return cli.DraftSource(**kw, given=frozenset(kw) - {"draft"})


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
    tree = subprocess.run(cmd + [f"--draft={draft_file}", "--spec_tree=3,2,4"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert tree.returncode == 0, tree.stderr[-2000:]
    assert tree.stdout == plain.stdout and "tree=(3, 2, 4)" in tree.stderr


def test_draft_flags_build_the_speculative_settings(cfg, draft_file, tmp_path):
    ids = np.arange(cfg.vocab_size)[::-1].astype(np.int32)  # a ranking: most frequent first
    save_frspec(ids, tmp_path / "freq.npy", {"vocab_size": cfg.vocab_size})
    spec = cli.load_speculative(cfg, draft_source(
        draft=str(draft_file), spec_k=4, frspec=str(tmp_path / "freq.npy"), frspec_size=100))
    assert spec.k == 4 and spec.frspec_ids.tolist() == ids[:100].tolist()
    assert spec.form == "mtp"  # the form save_mtp recorded


def test_spec_tree_flags_build_tree_settings(cfg, draft_file):
    spec = cli.load_speculative(cfg, draft_source(draft=str(draft_file), spec_tree="4,2,8",
                                                  spec_policy="fixed"))
    assert tuple(spec.tree) == (4, 2, 8) and spec.policy == "fixed" and spec.lookahead == 8


def test_draft_form_comes_from_the_file_unless_the_flag_names_one(cfg, tmp_path):
    path = tmp_path / "eagle.safetensors"
    save_mtp(cfg, init_mtp_params(cfg, jax.random.key(1)), path, form="cpmcu")
    assert cli.load_speculative(cfg, draft_source(draft=str(path))).form == "cpmcu"
    forced = cli.load_speculative(cfg, draft_source(draft=str(path), draft_form="mtp"))
    assert forced.form == "mtp"


@pytest.mark.parametrize("kw, match", [
    ({"spec_k": 2}, "only apply with --draft"),
    ({"frspec": "x.npy"}, "only apply with --draft"),
    ({"draft_form": "cpmcu"}, "only apply with --draft"),
    ({"draft": "{draft}", "spec_k": 0}, "--spec_k must be >= 1"),
    ({"draft": "{draft}", "frspec_size": 10}, "--frspec_size needs --frspec"),
    ({"draft": "{draft}", "draft_quantize": "rtn"}, "full-precision target"),
    ({"draft": "{draft}", "frspec": "{small}", "frspec_size": 99},
     r"--frspec_size must be in \[0, 8\]"),
    ({"draft": "{draft}", "frspec": "{alien}"}, "FR-Spec ids must be distinct ids in"),
    ({"draft": "{missing}"}, "no such file or training run"),
    ({"spec_tree": "4,2,8"}, "only apply with --draft"),
    ({"draft": "{draft}", "spec_tree": "4,2"}, "--spec_tree: tree shape must be three"),
    ({"draft": "{draft}", "spec_tree": "4,2,99"}, r"--spec_tree: tree size must be in"),
    ({"draft": "{draft}", "spec_policy": "fixed"}, "--spec_policy only applies with"),
])
def test_bad_flag_combinations_are_refused(cfg, draft_file, tmp_path, kw, match):
    save_frspec(np.arange(8), tmp_path / "small.npy")
    save_frspec(np.arange(cfg.vocab_size + 10), tmp_path / "alien.npy")  # another vocabulary
    paths = {"draft": draft_file, "small": tmp_path / "small.npy",
             "alien": tmp_path / "alien.npy", "missing": tmp_path / "nope"}
    kw = {k: v.format(**paths) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises((cli.UsageError, ValueError, FileNotFoundError), match=match):
        cli.load_speculative(cfg, draft_source(**kw))


def test_quantize_flag_quantizes_the_target_and_allows_a_quantized_draft(cfg, draft_file):
    qcfg, qparams, _ = cli.load_model(cli.ModelSource(random_preset="tiny", quantize="rtn",
                                                      quant_bits=8))
    assert is_quantized(qparams) and qparams["layers"]["wq"]["qweight"].dtype == np.int8
    spec = cli.load_speculative(qcfg, draft_source(draft=str(draft_file),
                                                   draft_quantize="rtn"), target_quantized=True)
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


def test_the_library_defines_no_flags():
    """Importing cpmjax.serve.cli (as tests and other libraries do) registers no absl flags."""
    r = subprocess.run([sys.executable, "-c", "from absl import flags; import cpmjax.serve.cli; "
                        "print(sorted(flags.FLAGS))"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "checkpoint" not in r.stdout and "spec_k" not in r.stdout
