"""Training checkpoints: newest good step is restored; a damaged or partial latest step is
detected, warned about and skipped. Model checkpoints: save/load round trip, no overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.train.checkpoint import INTEGRITY_FILE, TrainCheckpointer, load_model, save_model
from tests.conftest import tiny_hf_config


def _state(v: float) -> dict:
    return {"step": jnp.asarray(int(v), jnp.int32), "w": jnp.full((4, 8), v, jnp.float32)}


def _save_steps(workdir: Path, steps: list[int]) -> None:
    ck = TrainCheckpointer(workdir, max_to_keep=5, async_save=True)
    for s in steps:
        ck.save(s, _state(s), {"pos": s}, {"name": "t"})
    ck.close()


def _restore(workdir: Path):
    ck = TrainCheckpointer(workdir)
    try:
        return ck.restore(jax.eval_shape(lambda: _state(0)))
    finally:
        ck.close()


def test_restores_newest(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1, 2, 3])
    step, state, data = _restore(tmp_path)
    assert step == 3 and data == {"pos": 3}
    np.testing.assert_array_equal(state["w"], np.full((4, 8), 3.0))
    assert all((tmp_path / "checkpoints" / str(s) / INTEGRITY_FILE).is_file() for s in (1, 2, 3))


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file", "unsealed"])
def test_damaged_latest_falls_back_with_warning(tmp_path: Path, damage: str) -> None:
    _save_steps(tmp_path, [1, 2])
    latest = tmp_path / "checkpoints" / "2"
    data_files = sorted((p for p in (latest / "state").rglob("*") if p.is_file()),
                        key=lambda p: -p.stat().st_size)
    victim = data_files[0]
    if damage == "flip_byte":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "delete_file":
        victim.unlink()
    else:  # killed after orbax finished writing but before the seal
        (latest / INTEGRITY_FILE).unlink()
    with pytest.warns(UserWarning, match="checkpoint step 2 .*(damaged|partial)"):
        step, state, data = _restore(tmp_path)
    assert step == 1 and data == {"pos": 1}
    np.testing.assert_array_equal(state["w"], np.full((4, 8), 1.0))


def test_model_checkpoint_round_trip_and_no_overwrite(tmp_path: Path) -> None:
    cfg = ModelConfig.from_hf_config(tiny_hf_config())
    params = init_params(cfg, jax.random.key(1))
    out = save_model(cfg, params, tmp_path / "ckpt")
    cfg2, params2 = load_model(out)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError, match="not empty"):
        save_model(cfg, params, out)
    assert load_model(out)[0] == cfg  # the refused save left the checkpoint intact
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_load_model_from_run_paths(tmp_path: Path) -> None:
    """A run's workdir, its checkpoints/ and one checkpoints/<step> all load; a damaged step
    named explicitly is an error, not silently replaced."""
    cfg = ModelConfig.from_hf_config(tiny_hf_config())
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    ck = TrainCheckpointer(tmp_path, max_to_keep=5)
    for s in (1, 2):
        params = init_params(cfg, jax.random.key(s))
        ck.save(s, {"step": jnp.asarray(s), "params": params}, {}, {})
    ck.close()
    want = init_params(cfg, jax.random.key(2))
    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "2"):
        got = load_model(path)[1]
        np.testing.assert_array_equal(got["embed"], want["embed"])
    old = load_model(tmp_path / "checkpoints" / "1")[1]
    np.testing.assert_array_equal(old["embed"], init_params(cfg, jax.random.key(1))["embed"])
    (tmp_path / "checkpoints" / "2" / INTEGRITY_FILE).unlink()
    with pytest.warns(UserWarning, match="step 2"), pytest.raises(FileNotFoundError,
                                                                   match="no restorable step 2"):
        load_model(tmp_path / "checkpoints" / "2")
    with pytest.warns(UserWarning, match="step 2"):
        np.testing.assert_array_equal(load_model(tmp_path)[1]["embed"], old["embed"])


def test_load_mtp_params_from_run(tmp_path: Path) -> None:
    """The head is exportable on its own from a run with MTP; a run without one is an error."""
    from cpmjax.model.mtp import init_mtp_params
    from cpmjax.train.checkpoint import load_mtp_params

    cfg = ModelConfig.from_hf_config(tiny_hf_config())
    head = init_mtp_params(cfg, jax.random.key(3))
    for run, state in [("with", {"params": init_params(cfg, jax.random.key(0)),
                                 "mtp_params": head}),
                       ("without", {"params": init_params(cfg, jax.random.key(0))})]:
        (tmp_path / run).mkdir()
        (tmp_path / run / "config.json").write_text(json.dumps(cfg.to_hf_config()))
        ck = TrainCheckpointer(tmp_path / run)
        ck.save(1, state, {}, {})
        ck.close()
    got = load_mtp_params(tmp_path / "with")[1]
    for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(KeyError, match=r"no \['mtp_params'\].*mtp_weight"):
        load_mtp_params(tmp_path / "without")
