"""The GPTQ checkpoint export: its tensors, read back by a GPTQ v1 dequantizer written here
from the format's description, give cpmjax's quantized weights in the HF layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from cpmjax.config import ModelConfig
from cpmjax.convert import layout
from cpmjax.model import init_params
from cpmjax.quant import dequantize, quantize_params
from cpmjax.quant.gptq_export import save_gptq
from tests.conftest import tiny_hf_config


def _unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """32/bits unsigned values per int32 along ``axis``, the lowest bits first."""
    u = np.moveaxis(words.view(np.uint32), axis, 0)
    per, mask = 32 // bits, (1 << bits) - 1
    vals = np.stack([(u >> np.uint32(bits * k)) & np.uint32(mask) for k in range(per)], 1)
    return np.moveaxis(vals.reshape(u.shape[0] * per, *u.shape[1:]), 0, axis).astype(np.int64)


def gptq_v1_dequantize(t: dict[str, np.ndarray], bits: int) -> np.ndarray:
    """``[out, in]`` float32 weight of one GPTQ v1 linear (AutoGPTQ's QuantLinear rule)."""
    q = _unpack(t["qweight"], bits, 0)  # [in, out]
    z = _unpack(t["qzeros"], bits, 1) + 1  # [groups, out]; v1 stores zero - 1
    g = t["g_idx"]
    w = t["scales"].astype(np.float32)[g] * (q - z[g])
    return w.T


@pytest.mark.parametrize("bits", [4, 8])
def test_exported_tensors_dequantize_to_cpmjax_weights(tmp_path, bits: int) -> None:
    cfg = ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=2))
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    calib = [{"inputs": tokens, "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}]
    q = quantize_params(cfg, params, "gptq", bits=bits, group_size=32, calibration=calib)
    folder = save_gptq(cfg, q, tmp_path / "gptq")
    tensors = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq"}
    by_path = {e.path[-1]: e for e in layout.entries(cfg)}
    for key in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        e = by_path[key]
        for i, name in enumerate(layout.hf_names(e, cfg)):
            base = name.removesuffix(".weight")
            t = {f: tensors[f"{base}.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")}
            assert t["scales"].dtype == np.float16 and t["g_idx"].dtype == np.int32
            got = gptq_v1_dequantize(t, bits)
            one = {f: q["layers"][key][f][i] for f in ("qweight", "scales")}
            ours = np.asarray(dequantize(one)).reshape(params["layers"][key].shape[1:])
            want = layout.to_hf(e, ours)
            assert got.shape == want.shape == tuple(layout.hf_shape(e, ours.shape))
            # equal up to the float16 rounding of the scales
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)
            fp16 = {**one, "scales": np.asarray(one["scales"]).astype(np.float16)
                    .astype(np.float32)}
            np.testing.assert_array_equal(
                got, layout.to_hf(e, np.asarray(dequantize(fp16)).reshape(ours.shape)))
    np.testing.assert_array_equal(tensors["model.norm.weight"],
                                  np.asarray(params["final_norm"]).astype(np.float16))
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors


def test_unquantized_params_and_an_existing_folder_are_refused(tmp_path) -> None:
    cfg = ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=2))
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="layers.wq is not quantized"):
        save_gptq(cfg, params, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        save_gptq(cfg, quantize_params(cfg, params, "rtn", group_size=32), tmp_path / "b")
    assert (tmp_path / "b" / "mine.txt").read_text() == "keep"


def test_export_launcher_writes_a_loadable_folder(tmp_path) -> None:
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "launch/export_gptq.py", "--random_preset=tiny",
                          "--quantize=rtn", f"--out={tmp_path / 'q'}"], cwd=root,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wrote GPTQ checkpoint (rtn, 4 bits, group 128)" in run.stdout
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.qweight"].dtype == np.int32
    again = subprocess.run([sys.executable, "launch/export_gptq.py", "--random_preset=tiny",
                            "--quantize=none", f"--out={tmp_path / 'r'}"], cwd=root,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode != 0 and "give --quantize" in again.stderr
