"""Atomic writes leave either the old content or the new one, never a mix or a stray file."""

import os

import pytest

from cpmjax.atomic import atomic_dir, atomic_file, write_json, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_json_and_binary_writes_land_whole_with_usual_permissions(tmp_path):
    write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert (tmp_path / "sub" / "x.json").read_text() == '{\n  "a": 1\n}\n'
    with atomic_file(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_dir_replaces_only_after_success(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as d:
        (d / "f").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(out) as d:
            (d / "f").write_text("2")
            raise ValueError("failed half-way")
    assert (out / "f").read_text() == "1"
    with atomic_dir(out) as d:
        (d / "g").write_text("3")
    assert sorted(os.listdir(out)) == ["g"] and sorted(os.listdir(tmp_path)) == ["export"]
