"""Sources: JSONL, text and ArrayRecord files read back exactly; bad input names file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from cpmjax.data import DataError, read_documents

DOCS = ["First document.\nWith two lines.", "Zweites Dokument: ünïcödé ✓", "third"]


def test_jsonl_reads_text_field_and_skips_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n")
    assert read_documents(p, "jsonl", text_field="body") == DOCS


def test_text_file_and_folder(tmp_path: Path) -> None:
    for i, d in enumerate(DOCS):
        (tmp_path / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a .txt file")
    assert read_documents(tmp_path, "text") == DOCS
    assert read_documents(tmp_path / "01.txt", "text") == [DOCS[1]]


def test_arrayrecord_utf8_records(tmp_path: Path) -> None:
    p = tmp_path / "d.array_record"
    writer = ArrayRecordWriter(str(p), "group_size:1")
    for d in DOCS:
        writer.write(d.encode("utf-8"))
    writer.close()
    assert read_documents(p, "arrayrecord") == DOCS


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        read_documents(missing, "jsonl")


def test_jsonl_line_without_field_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    with pytest.raises(DataError, match=rf"{p}:2: .*'text'"):
        read_documents(p, "jsonl")


def test_jsonl_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n\n{broken\n")
    with pytest.raises(DataError, match=rf"{p}:3: not valid JSON"):
        read_documents(p, "jsonl")


def test_unknown_type_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown source type 'csv'"):
        read_documents(p, "csv")  # type: ignore[arg-type]


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{p}:2: not valid UTF-8 \(byte b'\\xe9' at offset 13"):
        read_documents(p, "jsonl")
    t = tmp_path / "t.txt"
    t.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(DataError, match=rf"{t}:2: not valid UTF-8"):
        read_documents(t, "text")
    a = tmp_path / "d.array_record"
    writer = ArrayRecordWriter(str(a), "group_size:1")
    for record in (b"fine", b"\xc3\x28"):
        writer.write(record)
    writer.close()
    with pytest.raises(DataError, match=rf"{a}: record 1: not valid UTF-8"):
        read_documents(a, "arrayrecord")


def test_unpaired_surrogate_in_jsonl_is_named(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "half a pair \\ud800 here"}\n')
    with pytest.raises(DataError, match=rf"{p}:2: the text has an unpaired surrogate"):
        read_documents(p, "jsonl")
