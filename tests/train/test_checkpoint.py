"""Training checkpoints: newest good step is restored; a damaged or partial latest step is
detected, warned about, quarantined and never re-sealed; seals are written when a save completes,
off the training thread, hashing in chunks; failed background saves surface at once. Model
checkpoints: save/load round trip, no overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.train.checkpoint import (INTEGRITY_FILE, CheckpointSaveError, TrainCheckpointer,
                                     all_finite, check_sealed, load_model, save_model)
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


def test_run_draft_form_reads_the_experiment(tmp_path: Path) -> None:
    from cpmjax.train.checkpoint import run_draft_form

    (tmp_path / "config.json").write_text(json.dumps(
        ModelConfig.from_hf_config(tiny_hf_config()).to_hf_config()))
    (tmp_path / "checkpoints").mkdir()
    assert run_draft_form(tmp_path) == "mtp"  # no experiment.json: a run from before the field
    (tmp_path / "experiment.json").write_text(json.dumps({"train": {"draft_form": "cpmcu"}}))
    assert run_draft_form(tmp_path) == "cpmcu"
    (tmp_path / "experiment.json").write_text(json.dumps({"train": {"draft_form": "x"}}))
    with pytest.raises(ValueError, match="draft form must be one of"):
        run_draft_form(tmp_path)


def _wait_for(cond, seconds: float = 60.0) -> None:
    import time

    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_a_step_is_sealed_when_its_save_completes_off_the_training_thread(tmp_path: Path,
                                                                          monkeypatch) -> None:
    """No later save or close is needed for the seal; the hashing runs on another thread."""
    import threading

    from cpmjax.train import checkpoint

    threads = []
    real = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256",
                        lambda f: threads.append(threading.current_thread().name) or real(f))
    ck = TrainCheckpointer(tmp_path, max_to_keep=5)
    ck.save(1, _state(1), {"pos": 1}, {})
    _wait_for(lambda: (tmp_path / "checkpoints" / "1" / INTEGRITY_FILE).is_file())
    assert threads and threading.main_thread().name not in threads
    ck.close()


def test_seal_hashes_in_chunks_never_whole_files(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    from cpmjax.atomic import storage_path
    from cpmjax.train import checkpoint

    step = tmp_path / "7"
    (step / "state").mkdir(parents=True)
    blob = np.random.default_rng(0).bytes(3 * checkpoint._CHUNK + 5)
    (step / "state" / "big").write_bytes(blob)
    reads = []
    path_class = type(storage_path(step))
    real_open = path_class.open

    def counting_open(self, mode="r", **kw):
        f = real_open(self, mode, **kw)
        real_read = f.read
        f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    monkeypatch.setattr(path_class, "open", counting_open)
    checkpoint.seal(step)
    assert reads and all(0 < n <= checkpoint._CHUNK for n in reads)  # never read(-1)
    seal_rec = json.loads((step / INTEGRITY_FILE).read_text())
    assert seal_rec["state/big"] == [len(blob), hashlib.sha256(blob).hexdigest()]


def test_old_steps_go_only_after_a_newer_one_is_sealed(tmp_path: Path) -> None:
    ck = TrainCheckpointer(tmp_path, max_to_keep=2)
    for s in (1, 2, 3, 4):
        ck.save(s, _state(s), {"pos": s}, {})
        sealed = [p for p in (tmp_path / "checkpoints").iterdir()
                  if (p / INTEGRITY_FILE).is_file()]
        assert sealed or s == 1  # once the first save is sealed, a complete step always exists
    ck.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]


def test_after_a_fallback_the_damaged_step_is_never_resealed(tmp_path: Path) -> None:
    """The scenario that made a damaged step load later: the resumed run saves the same step
    numbers again. The damaged copy is quarantined untouched and the new save is its own."""
    _save_steps(tmp_path, [1, 2])
    victim = max((p for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0xFF
    victim.write_bytes(bytes(raw))
    ck = TrainCheckpointer(tmp_path, max_to_keep=5)
    with pytest.warns(UserWarning, match="step 2 .* is damaged.*quarantine/2-damaged"):
        step, _, _ = ck.restore(jax.eval_shape(lambda: _state(0)))
    assert step == 1
    ck.save(2, _state(2.5), {"pos": 2}, {})
    with pytest.raises(CheckpointSaveError, match="step 2 already exists"):
        ck.save(2, _state(2.5), {"pos": 2}, {})
    ck.close()
    kept = tmp_path / "checkpoints" / "quarantine" / "2-damaged"
    assert check_sealed(kept)[0] == "damaged"  # still damaged, still its old seal
    step, state, _ = _restore(tmp_path)
    assert step == 2 and float(state["w"][0, 0]) == 2.5


def test_a_nonfinite_step_is_quarantined(tmp_path: Path) -> None:
    _save_steps(tmp_path, [1])
    ck = TrainCheckpointer(tmp_path, max_to_keep=5)
    ck.save(2, {"step": jnp.asarray(2), "w": jnp.full((4, 8), jnp.nan)}, {"pos": 2}, {})
    ck.close()
    with pytest.warns(UserWarning, match="step 2 .* holds non-finite numbers.*2-nonfinite"):
        assert _restore(tmp_path)[0] == 1
    assert all_finite({"a": jnp.ones(3), "n": jnp.asarray(3)})
    assert not all_finite({"a": jnp.asarray([1.0, jnp.inf])})


def test_a_failed_background_save_surfaces_at_the_next_check(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CPMJAX_FAULT", "enospc@2")
    ck = TrainCheckpointer(tmp_path, max_to_keep=5)
    ck.save(1, _state(1), {"pos": 1}, {})
    ck.save(2, _state(2), {"pos": 2}, {})

    def failed() -> bool:
        try:
            ck.check()
        except CheckpointSaveError as e:
            failed.message = str(e)
            return True
        return False

    _wait_for(failed)
    assert failed.message.startswith(f"checkpoint save of step 2 under {tmp_path / 'checkpoints'}"
                                     " failed: no space left on device")
    assert "a rerun resumes from step 1, the newest complete one" in failed.message
    assert "\n" not in failed.message
    ck.close()  # the failure was reported once; close() does not raise orbax's copy of it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                  if not p.name.startswith("2.")) == ["1"]
