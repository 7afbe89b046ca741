"""HF -> cpmjax -> HF round trip, and one clear error per kind of bad checkpoint."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import cpmjax
from cpmjax.config import ConfigError
from cpmjax.convert import CheckpointError, load_hf, save_hf
from tests.conftest import tiny_hf_config
from tests.convert.hf_fixtures import hf_tensors, write_hf_folder


def _read_all(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("tied, shards", [(False, 1), (True, 3)])
def test_round_trip_is_bit_exact(tmp_path, tied, shards):
    hf_cfg = tiny_hf_config(tie_word_embeddings=tied, use_cache=True, foo_extra={"a": [1, 2]})
    tensors = hf_tensors(hf_cfg)
    src = write_hf_folder(tmp_path / "src", hf_cfg, tensors, shards=shards)
    cfg, params = load_hf(src)
    dst = save_hf(cfg, params, tmp_path / "dst", max_shard_size=30_000)
    back = _read_all(dst)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and np.array_equal(back[name], t), name
    exported = json.loads((dst / "config.json").read_text())
    for key, value in hf_cfg.items():
        assert exported[key] == value, key


def test_bfloat16_checkpoint_round_trips_bit_exact(tmp_path):
    from safetensors.flax import load_file as load_jax, save_file as save_jax

    hf_cfg = tiny_hf_config(torch_dtype="bfloat16")
    tensors = {k: jnp.asarray(v, jnp.bfloat16) for k, v in hf_tensors(hf_cfg).items()}
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf_cfg))
    save_jax(tensors, str(src / "model.safetensors"))
    cfg, params = load_hf(src, dtype=jnp.bfloat16)
    assert params["layers"]["wq"].dtype == jnp.bfloat16
    dst = save_hf(cfg, params, tmp_path / "dst")
    back = load_jax(str(dst / "model.safetensors"))
    for name, t in tensors.items():
        assert back[name].dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(back[name]), np.asarray(t)), name


@pytest.fixture
def good_folder(tmp_path):
    hf_cfg = tiny_hf_config()
    return write_hf_folder(tmp_path / "ckpt", hf_cfg, hf_tensors(hf_cfg), shards=2), hf_cfg


def test_missing_tensor_is_named(tmp_path):
    hf_cfg = tiny_hf_config()
    t = hf_tensors(hf_cfg)
    del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj"):
        load_hf(write_hf_folder(tmp_path / "c", hf_cfg, t))


def test_unexpected_tensor_is_named(tmp_path):
    hf_cfg = tiny_hf_config()
    t = hf_tensors(hf_cfg)
    t["model.layers.0.self_attn.rotary.inv_freq"] = np.zeros(4, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*rotary\.inv_freq"):
        load_hf(write_hf_folder(tmp_path / "c", hf_cfg, t))


def test_misshaped_tensor_is_named_with_shapes(tmp_path):
    hf_cfg = tiny_hf_config()
    t = hf_tensors(hf_cfg)
    t["model.layers.2.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"k_proj.*\(16, 64\).*expected \(32, 64\)"):
        load_hf(write_hf_folder(tmp_path / "c", hf_cfg, t))


def test_truncated_file_is_named(good_folder):
    folder, _ = good_folder
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is corrupt or truncated"):
        load_hf(folder)


def test_garbage_file_is_named(good_folder):
    folder, _ = good_folder
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=rf"{shard.name} is corrupt"):
        load_hf(folder)


def test_index_naming_a_missing_shard(good_folder):
    folder, _ = good_folder
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard {shard.name}, which is missing"):
        load_hf(folder)


def test_unsupported_config_names_the_file_and_field(good_folder):
    folder, hf_cfg = good_folder
    (folder / "config.json").write_text(json.dumps(dict(hf_cfg, num_key_value_heads=3)))
    with pytest.raises(ConfigError, match=r"config.json.*'num_attention_heads'.*divisible"):
        load_hf(folder)


def test_tied_config_with_lm_head_tensor(tmp_path):
    hf_cfg = tiny_hf_config()
    t = hf_tensors(hf_cfg)  # untied tensors (has lm_head) ...
    folder = write_hf_folder(tmp_path / "c", dict(hf_cfg, tie_word_embeddings=True), t)
    with pytest.raises(CheckpointError, match="lm_head.weight but config.json says tie"):
        load_hf(folder)


def test_export_refuses_to_overwrite_and_keeps_the_old_folder(good_folder, tmp_path):
    """Without overwrite nothing is replaced; with it, only a previous export is: a folder with
    files its manifest does not list (a user's file) is refused and left as it was."""
    folder, _ = good_folder
    cfg, params = load_hf(folder)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(cfg, params, dst)
    with pytest.raises(FileExistsError, match="precious.txt.*nothing was changed"):
        save_hf(cfg, params, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["precious.txt"]
    assert (dst / "precious.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    (dst / "precious.txt").unlink()
    save_hf(cfg, params, dst)  # an empty folder is fine
    save_hf(cfg, params, dst, overwrite=True, format="llama")  # a previous export is replaced
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llama"
    assert not (dst / "modeling_minicpm.py").exists()  # the old export's files went with it
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (dst / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_cpmjax_load_of_hf_folder_and_token_validation(good_folder):
    folder, _ = good_folder
    model = cpmjax.load(folder)
    assert model.logits([[1, 2, 3]]).shape == (1, 3, model.config.vocab_size)
    with pytest.raises(ValueError, match="token id 97 is outside the vocabulary"):
        model.logits([[1, 97]])
    with pytest.raises(ValueError, match="must be integers"):
        model.logits([[1.5, 2.0]])
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        cpmjax.load(folder / "nope")


def test_unsupported_model_type_is_named(good_folder):
    folder, hf_cfg = good_folder
    (folder / "config.json").write_text(json.dumps(dict(hf_cfg, model_type="qwen2")))
    with pytest.raises(ConfigError, match=r"config.json.*model_type.*'qwen2'"):
        load_hf(folder)


def test_llama_config_with_per_length_longrope_lists_is_refused(good_folder):
    folder, hf_cfg = good_folder  # hf_cfg's long and short factor lists differ
    llama = dict(hf_cfg, model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ConfigError, match=r"config.json.*different long_factor and short_factor"):
        load_hf(folder)


def test_export_checks_params_and_dtype_before_writing(good_folder, tmp_path):
    folder, _ = good_folder
    cfg, params = load_hf(folder)
    bad = dict(params, layers=dict(params["layers"], wk=params["layers"]["wk"][:, :, :1]))
    with pytest.raises(ValueError, match=r"params\['layers'\]\['wk'\] has shape \(3, 64, 1, 16\)"
                                         r", the config expects \(3, 64, 2, 16\)"):
        save_hf(cfg, bad, tmp_path / "out")
    with pytest.raises(ValueError, match="dtype must be one of .* got 'int8'"):
        save_hf(cfg, params, tmp_path / "out", dtype="int8")
    assert not any(tmp_path.glob("*out*"))
