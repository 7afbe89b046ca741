"""Export destinations: --overwrite replaces only a previous export (its manifest lists every
file), never a folder holding the source or anything else; exports carry the tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cpmjax
from cpmjax.convert import load_hf, save_hf
from cpmjax.convert.export_dir import MANIFEST, check_destination
from cpmjax.data.tokenizer import train_tokenizer
from cpmjax.train.checkpoint import save_model
from tests.conftest import tiny_hf_config
from tests.convert.hf_fixtures import hf_tensors, write_hf_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf_cfg = tiny_hf_config()
    folder = write_hf_folder(tmp_path_factory.mktemp("m") / "src", hf_cfg, hf_tensors(hf_cfg))
    train_tokenizer(["a tokenizer for the export tests"] * 4, 300).save(str(folder /
                                                                        "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder, *load_hf(folder)


def test_destination_rules(tmp_path) -> None:
    src = tmp_path / "out" / "model"
    src.mkdir(parents=True)
    for dst in (tmp_path / "out", src, tmp_path):
        with pytest.raises(FileExistsError, match=f"destination {dst} contains the source"):
            check_destination(dst, True, [src])
    assert check_destination(tmp_path / "new", False, [src]) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        check_destination(tmp_path / "file", True)


def test_overwrite_replaces_only_a_previous_export(model, tmp_path) -> None:
    folder, cfg, params = model
    for write in (lambda dst, **kw: save_hf(cfg, params, dst, **kw),
                  lambda dst, **kw: save_model(cfg, params, dst, **kw)):
        dst = write(tmp_path / f"e{id(write)}", tokenizer=folder / "tokenizer.json")
        listed = json.loads((dst / MANIFEST).read_text())["files"]
        assert "tokenizer.json" in listed and "tokenizer_config.json" in listed
        write(dst, overwrite=True)  # a previous export: replaced
        (dst / "notes.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="files that its export manifest does not list: "
                                                  "notes.txt.*nothing was changed"):
            write(dst, overwrite=True)
        assert (dst / "notes.txt").read_text() == "mine" and (dst / "config.json").is_file()
    legacy = tmp_path / "legacy"  # written before exports had a manifest, or by something else
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=f"no {MANIFEST} \\(it is not a previous cpmjax"):
        save_hf(cfg, params, legacy, overwrite=True)


def test_export_carries_the_source_tokenizer(model, tmp_path) -> None:
    folder = model[0]
    loaded = cpmjax.load(folder)
    assert loaded.tokenizer_path == folder / "tokenizer.json" and loaded.path == folder
    out = cpmjax.save_hf(loaded, tmp_path / "hf", format="llama")
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert cpmjax.load(out).tokenizer.get_vocab_size() == loaded.tokenizer.get_vocab_size()
    with pytest.raises(FileExistsError, match="contains the source"):
        cpmjax.save_hf(loaded, folder.parent, overwrite=True)


def test_convert_overwrite_never_deletes_the_source_or_other_files(tmp_path) -> None:
    """The reported case: --dst holding --src (and an unrelated file) with --overwrite."""
    hf_cfg = tiny_hf_config()
    dst = tmp_path / "exports"
    src = write_hf_folder(dst / "model", hf_cfg, hf_tensors(hf_cfg))
    (dst / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), f"--src={src}",
                           f"--dst={dst}", "--overwrite"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 1
    assert f"convert: error: destination {dst} contains the source {src}" in done.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
