"""BitCPM ternary weights: the quantizer by hand, the straight-through gradient, int8
activations, 2-bit packing, serving packed params, the packed folder's checks and parity of the
fake-quantized HF export with transformers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it at import

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpmjax
from cpmjax.config import ConfigError, ModelConfig
from cpmjax.model import forward, init_params
from cpmjax.quant import ternary
from cpmjax.quant.qforward import layer_transform_for
from cpmjax.serve.generate import generate
from cpmjax.train.step import transformed_forward
from tests.conftest import tiny_hf_config

TC = ternary.TernaryConfig(group_size=16)


@pytest.fixture(scope="module")
def model() -> tuple[ModelConfig, dict]:
    cfg = ModelConfig.from_hf_config(tiny_hf_config())
    return cfg, init_params(cfg, jax.random.key(3))


def test_absmean_groups_round_and_clip_by_hand():
    w = np.array([[0.9, -0.1], [-0.3, 0.2], [0.05, -2.0], [0.4, 0.0]], np.float32)  # [in 4, out 2]
    s = np.asarray(ternary.absmean_scales(jnp.asarray(w), 2, 1e-5))
    want = np.array([[0.6, 0.15], [0.225, 1.0]], np.float32)  # mean |w| of rows 0-1, rows 2-3
    np.testing.assert_allclose(s, want, rtol=1e-6)
    q = np.asarray(ternary.ternary_codes(jnp.asarray(w), jnp.asarray(s)))
    # 0.9/0.6=1.5 -> 2 -> clip 1; -0.3/0.6 -> -0.5 -> 0 (half to even); 0.2/0.15 -> 1; -2 -> -1
    np.testing.assert_array_equal(q, [[1, -1], [0, 1], [0, -1], [1, 0]])
    fq = np.asarray(ternary.fake_quant_2d(jnp.asarray(w), 2, 1e-5))
    np.testing.assert_allclose(fq, q * np.repeat(want, 2, axis=0), rtol=1e-6)


def test_per_channel_and_per_tensor_scales_and_eps():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 5)), jnp.float32)  # 3 layers
    per_channel = ternary.absmean_scales(w, -1, 1e-5)
    per_tensor = ternary.absmean_scales(w, 0, 1e-5)
    assert per_channel.shape == (3, 1, 5) and per_tensor.shape == (3, 1, 1)
    np.testing.assert_allclose(per_tensor[:, 0, 0], np.abs(np.asarray(w)).mean(axis=(1, 2)),
                               rtol=1e-6)
    zeros = ternary.fake_quant_2d(jnp.zeros((4, 2)), 2, 1e-5)
    assert not np.isnan(np.asarray(zeros)).any() and not np.asarray(zeros).any()
    values = np.unique(np.asarray(ternary.fake_quant_2d(w[0], 0, 1e-5)))
    assert len(values) == 3 and values[1] == 0 and values[0] == -values[2]


def test_straight_through_gradient_is_identity():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(64, 32)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(2).normal(size=(64, 32)), jnp.float32)
    value, grad = jax.value_and_grad(lambda v: jnp.sum(ternary.ste(v, "w_up", TC) * c))(w)
    np.testing.assert_allclose(grad, c)
    want = jnp.sum(ternary.fake_quant(w, "w_up", TC) * c)
    np.testing.assert_allclose(value, want, rtol=1e-5)


def test_int8_activations_per_token_with_straight_through_gradient():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 16)), jnp.float32)
    q = ternary.int8_activations(x)
    scale = 127.0 / np.abs(np.asarray(x)).max(-1, keepdims=True)
    codes = np.asarray(q) * scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert np.abs(codes).max() <= 127.001 and np.abs(np.asarray(q - x)).max() > 0
    grad = jax.grad(lambda v: jnp.sum(ternary.int8_activations(v) * 3.0))(x)
    np.testing.assert_allclose(grad, 3.0)


def test_packing_layout_by_hand_and_round_trip():
    codes = np.array([[1], [-1], [0], [1]], np.int8)  # one column, rows 0..3 -> one byte
    packed = ternary.pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (1, 1)
    assert int(packed[0, 0]) == 2 | (0 << 2) | (1 << 4) | (2 << 6)
    rng = np.random.default_rng(4)
    many = rng.integers(-1, 2, size=(3, 32, 7)).astype(np.int8)
    np.testing.assert_array_equal(ternary.unpack_codes(jnp.asarray(ternary.pack_codes(many))),
                                  many)
    with pytest.raises(ValueError, match="divisible by 4"):
        ternary.pack_codes(np.zeros((6, 2), np.int8))


def test_packed_params_serve_like_the_fake_quantized_model(model):
    cfg, params = model
    packed = ternary.pack_params(params, TC)
    fake = ternary.fake_quant_params(params, TC)
    assert packed["layers"]["wq"]["qweight"].dtype == jnp.uint8
    assert packed["layers"]["wq"]["qweight"].shape == (3, 16, 64)  # [L, d/4, H*hd]
    toks = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 24)))
    run = jax.jit(lambda p: forward(p, cfg, toks, layer_transform=layer_transform_for(p, cfg)))
    ours, want, full = (run(p).logits for p in (packed, fake, params))
    assert np.abs(np.asarray(ours - want)).max() <= 1e-5
    assert np.abs(np.asarray(full - want)).max() > 1e-2  # the ternary model is a different one
    prompts = [[1, 5, 9, 3], [1, 7]]
    assert (generate(cfg, packed, prompts, max_new_tokens=6)
            == generate(cfg, fake, prompts, max_new_tokens=6))


def test_qat_transforms_match_fake_quant_forward_and_keep_gradients(model):
    cfg, params = model
    tc = ternary.TernaryConfig(group_size=-1, targets=ternary.LINEARS + ("embed", "lm_head"))
    t = ternary.qat_transforms(tc)
    toks = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 16)))
    fake = jax.jit(lambda p: forward(p, cfg, toks).logits)(ternary.fake_quant_params(params, tc))
    qat_logits = jax.jit(lambda p: transformed_forward(p, cfg, toks, t).logits)
    assert np.abs(np.asarray(qat_logits(params) - fake)).max() <= 1e-4
    grads = jax.jit(jax.grad(lambda p: jnp.mean(qat_logits(p) ** 2)))(params)
    assert all(float(jnp.abs(grads["layers"][k]).sum()) > 0 for k in ternary.LINEARS)
    assert float(jnp.abs(grads["embed"]).sum()) > 0


def test_config_validation_names_the_field(model):
    cfg, _ = model
    with pytest.raises(ConfigError, match="'qat.group_size': 48 does not divide the input dim 64"):
        ternary.TernaryConfig(group_size=48).validate(cfg)
    with pytest.raises(ConfigError, match="'qat.targets'"):
        ternary.TernaryConfig(targets=("wq", "conv")).validate(cfg)
    tied = ModelConfig.from_hf_config(tiny_hf_config(tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="no lm_head in a model with tied embeddings"):
        ternary.TernaryConfig(targets=("lm_head",)).validate(tied)
    with pytest.raises(ConfigError, match="'qat.act_bits': 4 is not 0 or 8"):
        ternary.TernaryConfig(act_bits=4).validate(cfg)
    assert ternary.transforms_for_run({"enabled": False}, cfg) is None
    tc = ternary.TernaryConfig.from_dict({"group_size": 32, "targets": "wq, w_down"})
    assert tc.targets == ("wq", "w_down") and tc.group_size == 32


def test_packed_folder_round_trip_and_damage(model, tmp_path):
    cfg, params = model
    packed = ternary.pack_params(params, TC)
    folder = ternary.save_packed(cfg, packed, tmp_path / "packed", TC)
    with pytest.raises(FileExistsError):
        ternary.save_packed(cfg, packed, folder, TC)
    back = cpmjax.load(folder)  # the public loader recognises the format
    np.testing.assert_array_equal(back.params["layers"]["w_up"]["qweight"],
                                  packed["layers"]["w_up"]["qweight"])
    toks = [[1, 4, 8, 2, 6]]
    np.testing.assert_allclose(back.generate(toks, max_new_tokens=4),
                               generate(cfg, packed, toks, max_new_tokens=4))
    n = sum(int(np.prod(params["layers"][k].shape)) for k in ternary.LINEARS)
    # fp32 (4 bytes) -> 2 bits per weight + one fp32 scale per 16 weights
    assert ternary.packed_nbytes(packed) == ternary.packed_nbytes(params) - 4 * n + n // 4 + n // 4

    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / ternary.PACKED_FILE))
    bad = dict(tensors)
    bad["layers.wk.qweight"] = bad["layers.wk.qweight"] | np.uint8(3)  # code 3 is not ternary
    save_file(bad, str(folder / ternary.PACKED_FILE))
    with pytest.raises(ValueError, match="layers.wk.qweight holds the invalid 2-bit code 3"):
        ternary.load_packed(folder)
    bad = {k: v for k, v in tensors.items() if k != "layers.wo.scales"}
    save_file(bad, str(folder / ternary.PACKED_FILE))
    with pytest.raises(ValueError, match=r"missing tensors \['layers.wo.scales'\]"):
        ternary.load_packed(folder)
    bad = {**tensors, "layers.wv.scales": tensors["layers.wv.scales"][:, :1]}
    save_file(bad, str(folder / ternary.PACKED_FILE))
    with pytest.raises(ValueError, match="layers.wv.scales is float32\\[3, 1, 32\\]"):
        ternary.load_packed(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no quantization_config with quant_method"):
        ternary.load_packed(folder)


def test_fake_quantized_hf_export_matches_transformers(model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params = model
    packed = ternary.pack_params(params, TC)
    cpmjax.save_hf(cpmjax.Model(cfg, ternary.fake_quant_params(params, TC)), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                              dtype=torch.float32)
    toks = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        theirs = hf(torch.tensor(toks)).logits.numpy()
    ours = jax.jit(lambda p: forward(p, cfg, jnp.asarray(toks),
                                     layer_transform=layer_transform_for(p, cfg)).logits)(packed)
    assert np.abs(theirs - np.asarray(ours)).max() <= 1e-4
    q = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()  # [out, in]
    per_group = q.T.reshape(4, 16, -1)  # every group of 16 input rows: {-s, 0, s}
    assert all(len(np.unique(np.abs(g[:, c]))) <= 2 for g in per_group for c in range(5))
