"""Document sources: plain text, JSONL and ArrayRecord files, read into lists of strings.

Text: one document per ``.txt`` file (a file, or every ``.txt`` under a folder, sorted by path).
JSONL: one document per line, from a text field; blank lines are skipped. ArrayRecord: one UTF-8
document per record (not pre-tokenized ids: the tokenizer stays a pipeline parameter). Errors name the file (and the line for JSONL).
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
        return [f.read_text(encoding="utf-8") for f in files]
    if type == "arrayrecord":
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(str(p))
        try:
            return [r.decode("utf-8") for r in reader.read_all()]
        finally:
            reader.close()
    raise DataError(f"unknown source type {type!r} for {p} (expected text, jsonl or arrayrecord)")


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    return [record[text_field] for record in read_jsonl_records(path, text_field)]


def read_jsonl_records(path: str | Path, text_field: str = "text") -> list[dict]:
    """Every record of a JSONL file, each a dict with a string ``text_field`` (blank lines
    skipped); errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{lineno}: record has no string field {text_field!r}")
            records.append(record)
    return records
