"""Steps compile ahead of time for TPU topologies (libtpu's compiler on this CPU host) and run
the Pallas kernels there: the 0.5B train step with splash attention forward and backward, the
serving engine's prefill and decode steps, and a tree speculative decoding round."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from cpmjax.parallel import aot
from cpmjax.presets import model_config
from cpmjax.train.experiment import experiment_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed")


def test_0p5b_train_step_compiles_for_v5e_with_splash_forward_and_backward():
    mesh = aot.tpu_mesh("v5e:2x2", (1, -1, 1))
    cfg = model_config("minicpm4_0p5b")
    compiled = aot.compile_train_step(cfg, experiment_config({}, "minicpm4_0p5b").train, mesh,
                                      1024, batch=4)
    row = aot.report(compiled, "v5e:2x2")
    # fp32 params + two Adam moments of ~0.5B params sharded 4 ways: > 1 GiB of arguments each
    assert row["per_device_gib"]["arguments"] > 1.0
    assert 0 < row["hbm_fraction"] < 1
    kernels = row["pallas_kernels"]
    # 24 layers under one scan: the forward kernel (again in the rematerialised backward), dQ, dK/dV
    assert kernels["splash_mha_fwd_segmented_residuals"] >= 1
    assert kernels["splash_mha_dq_segmented_no_residuals"] == 1
    assert kernels["splash_mha_dkv_segmented_no_residuals"] == 1
    assert row["cost"]["flops"] > 0 and row["cost"]["bytes_accessed"] > 0


def test_serving_steps_compile_for_one_v5e_chip():
    mesh = aot.tpu_mesh("v5e:2x2", (1, -1, 1), num_devices=1)
    cfg = model_config("tiny")
    prefill = aot.report(aot.compile_prefill_chunk(cfg, mesh, 1024, 128), "v5e:2x2")
    decode = aot.report(aot.compile_decode_step(cfg, mesh, 1024, 4), "v5e:2x2")
    for row in (prefill, decode):
        assert row["per_device_gib"]["arguments"] > 0 and row["cost"]["flops"] > 0


def test_tree_round_compiles_for_one_v5e_chip_without_copying_the_cache():
    """One round of the tree engine (draft tree, tree-masked verify, acceptance, compaction)
    costs more than a decode step (it verifies 17 tokens and runs the draft layer), and the
    compaction moves the accepted path and its compressed keys in place: no cache relayout.
    Tiny widened to head_dim 128, as MiniCPM4-8B's (at 32 libtpu keeps the cache S-minor and
    relays it out for the tree's scatters), with MiniCPM4's sparse_config (compressed keys);
    in both draft forms."""
    mesh = aot.tpu_mesh("v5e:2x2", (1, -1, 1), num_devices=1)
    cfg = dataclasses.replace(model_config("tiny", sparse="on", dense_len=1024),
                              hidden_size=256, num_attention_heads=2)
    cache = aot.cache_shapes(cfg, 1024, 4)
    tree = aot.report(aot.compile_tree_step(cfg, mesh, 1024, 4, (4, 4, 16), frspec_size=256),
                      "v5e:2x2", cache=cache)
    decode = aot.report(aot.compile_decode_step(cfg, mesh, 1024, 4), "v5e:2x2", cache=cache)
    assert tree["per_device_gib"]["arguments"] >= decode["per_device_gib"]["arguments"] > 0
    assert tree["cost"]["flops"] > 4 * decode["cost"]["flops"] > 0
    assert tree["cache_sized_copies"] == 0 == decode["cache_sized_copies"], (tree, decode)
    # a 1024-token read reaches dense_len: the nodes verify through InfLLM v2's TPU kernel
    assert tree["pallas_kernels"].get("infllmv2_fwd_lse", 0) > 0, tree["pallas_kernels"]
    # CPM.cu's draft form compiles the same way
    cpmcu = aot.report(aot.compile_tree_step(cfg, mesh, 1024, 4, (4, 4, 16), frspec_size=256,
                                             draft_form="cpmcu"), "v5e:2x2", cache=cache)
    assert cpmcu["cache_sized_copies"] == 0 and cpmcu["per_device_gib"]["arguments"] > 0, cpmcu


def test_kernel_counts_reads_kernel_names_from_hlo():
    hlo = ('  %splash_mha_dq_segmented_no_residuals.1 = (f32[2]) custom-call(%a), '
           'custom_call_target="tpu_custom_call"\n'
           '  ROOT %fwd = f32[] custom-call(), custom_call_target="tpu_custom_call"\n'
           '  %other = f32[] custom-call(), custom_call_target="Sharding"')
    assert aot.kernel_counts(hlo) == {"total": 2, "fwd": 1,
                                      "splash_mha_dq_segmented_no_residuals": 1}


def test_sparse_train_step_on_packed_rows_compiles_with_infllmv2_kernels_forward_and_backward():
    """InfLLM v2 training goes through the block-sparse Pallas kernels, not a masked dense path:
    MiniCPM4's sparse_config on packed rows (the train step always passes segment ids)."""
    mesh = aot.tpu_mesh("v5e:2x2", (1, -1, 1))
    cfg = model_config("tiny", sparse="on", dense_len=512)
    compiled = aot.compile_train_step(cfg, experiment_config({}, "tiny").train, mesh, 2048,
                                      batch=4)
    kernels = aot.report(compiled, "v5e:2x2")["pallas_kernels"]
    # forward (again in the rematerialised backward), dQ and dK/dV, once in each branch of the
    # dense/sparse switch (documents shorter than dense_len attend to all their blocks through
    # the same kernel); no masked dense path and no splash call in a sparse layer
    assert kernels.get("infllmv2_fwd", 0) + kernels.get("infllmv2_fwd_lse", 0) >= 2, kernels
    assert kernels.get("infllmv2_dq") == 2 and kernels.get("infllmv2_dkv") == 2, kernels
    assert kernels["total"] == sum(v for k, v in kernels.items() if k.startswith("infllmv2")), \
        kernels
