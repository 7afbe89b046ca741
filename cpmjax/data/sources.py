"""Document sources: plain text, JSONL and ArrayRecord files, read into lists of strings.

Text: one document per ``.txt`` file (a file, or every ``.txt`` under a folder, sorted by path).
JSONL: one document per line, from a text field; blank lines are skipped. ArrayRecord: one UTF-8
document per record (not pre-tokenized ids: the tokenizer stays a pipeline parameter). Errors name
the file and the line (JSONL, text) or record (ArrayRecord): bad JSON, a missing text field, bytes
that are not UTF-8, text with unpaired surrogates (JSON escapes such as ``"\ud800"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

SourceType = Literal["text", "jsonl", "arrayrecord"]


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


def read_documents(path: str | Path, type: SourceType, text_field: str = "text") -> list[str]:
    """All documents of one source, in file order, so packing and splits are deterministic."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data source {p} does not exist")
    if type == "jsonl":
        return _read_jsonl(p, text_field)
    if type == "text":
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        return [_decode(f.read_bytes(), f) for f in files]
    if type == "arrayrecord":
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(str(p))
        try:
            return [_decode(r, f"{p}: record {i}") for i, r in enumerate(reader.read_all())]
        finally:
            reader.close()
    raise DataError(f"unknown source type {type!r} for {p} (expected text, jsonl or arrayrecord)")


def _decode(raw: bytes, where: Path | str) -> str:
    """UTF-8 text of ``raw``, or a DataError naming ``where`` (a whole file: file and line)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if isinstance(where, Path):
            line = raw.count(b"\n", 0, e.start) + 1
            where = f"{where}:{line}"
        raise DataError(f"{where}: not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at "
                        f"offset {e.start})") from None


def _check_text(text: str, path: Path, lineno: int) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path}:{lineno}: the text has an unpaired surrogate "
                        f"({text[e.start]!r} at character {e.start}), which is not Unicode text"
                        ) from None
    return text


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    return [record[text_field] for record in read_jsonl_records(path, text_field)]


def read_jsonl_records(path: str | Path, text_field: str = "text") -> list[dict]:
    """Every record of a JSONL file, each a dict with a string ``text_field`` (blank lines
    skipped); errors name the file and line (invalid UTF-8, unpaired surrogates, bad JSON)."""
    path = Path(path)
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{lineno}: record has no string field {text_field!r}")
            _check_text(record[text_field], path, lineno)
            records.append(record)
    return records
