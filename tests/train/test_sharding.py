"""Sharded training on 8 fake CPU devices equals one device; every state leaf's PartitionSpec
matches the intended layout. Runs in a subprocess because the device count must be set before
JAX initialises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpmjax.parallel.mesh import mesh_shape

ROOT = Path(__file__).resolve().parents[2]

# tiny test model (tests/conftest.py): d=64, H=4, KV=2, hd=16, I=96, V=97, untied head.
# On fsdp=4 x tensor=2: "embed"->fsdp, heads/kv_heads/mlp/vocab->tensor; V=97 is not divisible
# by 2 so vocab stays replicated; norms are replicated.
GOLDEN_FSDP4_TENSOR2 = {
    "['params']['embed']": [None, 'fsdp'],
    "['params']['final_norm']": [None],
    "['params']['lm_head']": ['fsdp', None],
    "['params']['layers']['input_norm']": [None, None],
    "['params']['layers']['post_norm']": [None, None],
    "['params']['layers']['wq']": [None, 'fsdp', 'tensor', None],
    "['params']['layers']['wk']": [None, 'fsdp', 'tensor', None],
    "['params']['layers']['wv']": [None, 'fsdp', 'tensor', None],
    "['params']['layers']['wo']": [None, 'tensor', None, 'fsdp'],
    "['params']['layers']['w_gate']": [None, 'fsdp', 'tensor'],
    "['params']['layers']['w_up']": [None, 'fsdp', 'tensor'],
    "['params']['layers']['w_down']": [None, 'tensor', 'fsdp'],
    "['step']": [],
    "['nonfinite_steps']": [],
}


@pytest.fixture(scope="module")
def sharded() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.train.sharded_run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_losses_equal_single_device(sharded: dict) -> None:
    single = sharded["single"][0]
    assert single[-1] < single[0]
    for name in ("fsdp4_tensor2", "data2_tensor4"):
        np.testing.assert_allclose(sharded[name][0], single, rtol=2e-6, err_msg=name)
    # splash attention per shard (shard_map with specs from the rules table)
    np.testing.assert_allclose(sharded["fsdp4_tensor2_splash"][0], single, rtol=1e-5)


def test_partition_spec_golden(sharded: dict) -> None:
    specs = sharded["fsdp4_tensor2"][1]
    for path, spec in GOLDEN_FSDP4_TENSOR2.items():
        assert specs[path] == spec, path
    # Adam moments mirror their parameter; the step counters are replicated
    moments = {p: s for p, s in specs.items() if p.startswith("['opt_state']")}
    for p, s in moments.items():
        leaf = next((k for k in GOLDEN_FSDP4_TENSOR2 if k.startswith("['params']")
                     and p.endswith(k[len("['params']"):])), None)
        assert s == (GOLDEN_FSDP4_TENSOR2[leaf] if leaf else []), p
    assert sum(1 for s in moments.values() if "fsdp" in s) == 2 * 9  # mu, nu of 9 matrices
    single = sharded["single"][1]
    assert all(all(a is None for a in s) for s in single.values())  # one device: replicated


def test_mesh_shape_fill_and_errors() -> None:
    assert mesh_shape(8, fsdp=-1, tensor=2) == (1, 4, 2)
    assert mesh_shape(8, data=-1, fsdp=2, tensor=2) == (2, 2, 2)
    with pytest.raises(ValueError, match="only one mesh axis"):
        mesh_shape(8, data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_shape(8, fsdp=-1, tensor=3)
    with pytest.raises(ValueError, match="'tensor' must be"):
        mesh_shape(8, tensor=0)
