"""The default corpus: real English prose every Python install already has, built on first use.

Sources: the interpreter's documentation topics (``pydoc_data.topics``) and the docstrings of the
standard library's modules, read with ``ast`` from the source files (nothing is imported, so no
module runs). Nothing third-party is committed; the corpus is rebuilt from the machine's own files
and cached. Documents go to ``train.jsonl`` / ``valid.jsonl`` (every 20th document held out).
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from cpmjax.atomic import atomic_file

HELD_OUT_EVERY = 20
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
              "__pycache__", "ensurepip", "venv", "tkinter", "pydoc_data"}
MIN_DOC_CHARS = 200


def _module_docstrings(path: Path) -> str:
    """All module/class/function docstrings of one source file, in file order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def iter_documents() -> Iterator[str]:
    """Documents in a fixed order: documentation topics, then stdlib docstrings by path."""
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key].strip()
        if len(text) >= MIN_DOC_CHARS:
            yield text
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(stdlib).parts):
            continue
        text = _module_docstrings(path)
        if len(text) >= MIN_DOC_CHARS:
            yield text


def _write_jsonl_atomic(path: Path, docs: list[str]) -> None:
    with atomic_file(path) as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def build_default_corpus(cache_dir: str | os.PathLike) -> Path:
    """Folder with ``train.jsonl`` and ``valid.jsonl``; built once, then reused."""
    out = Path(cache_dir) / "corpus"
    if (out / "train.jsonl").is_file() and (out / "valid.jsonl").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    docs = list(iter_documents())
    valid = docs[::HELD_OUT_EVERY]
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY]
    _write_jsonl_atomic(out / "valid.jsonl", valid)
    _write_jsonl_atomic(out / "train.jsonl", train)
    return out
