"""Atomic writes: every file or folder the project writes appears whole or not at all.

A write goes to a temporary name in the destination's own folder (same filesystem, so the final
``os.replace`` is atomic) and is renamed into place only after it finished; a failure or a kill
leaves the previous content untouched and at most a hidden ``.NAME.tmp-*`` entry behind. This is
the one implementation every writer in the project uses.

Object-store URLs (``gs://bucket/run/x.json``) go through ``etils.epath``, the path library orbax
uses: ``pathlib`` would turn ``gs://bucket`` into the local path ``gs:/bucket``. An object store
publishes an object only once its upload completes, so there the content is buffered and uploaded
in one piece on success (nothing on failure).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as ``gs://bucket/run`` (any ``scheme://``), which only epath handles."""
    return "://" in os.fspath(path)


def storage_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URL kept exactly as given, a local path made absolute."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
                ) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit it is flushed, fsynced and
    renamed onto ``path``, on an exception removed. ``mode`` is ``"w"`` or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    if is_remote(path):
        buffer: IO[Any] = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        with epath.Path(os.fspath(path)).open(mode) as f:
            f.write(buffer.getvalue())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(text)
    return storage_path(path) if is_remote(path) else Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to ``path`` to fill; on a clean exit it replaces ``path`` (an old
    ``path`` is removed only once the new one is in place), on an exception it is removed.

    Callers decide beforehand whether replacing an existing ``path`` is allowed."""
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _usual_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and some writers make 0600 files; give the finished folder the
    permissions any new folder would get (umask applied), so it can be shared like a download."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
