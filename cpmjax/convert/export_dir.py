"""Export destinations: what an export may replace, the manifest that marks a folder as one, and
the tokenizer files that travel with a model.

An export writes ``cpmjax_export.json`` listing every file it wrote. ``overwrite`` then replaces
only a folder that is empty or whose files are all listed in its manifest, and never one that
contains the export's own source: a destination holding anything else (a user's files, the model
being converted) is refused with the names of the files in the way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

MANIFEST = "cpmjax_export.json"
# the files of a Hugging Face tokenizer folder that an export carries along when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def check_destination(out: str | os.PathLike, overwrite: bool,
                      sources: Iterable[str | os.PathLike] = ()) -> Path:
    """The absolute destination, after refusing one that the export must not replace."""
    out = Path(out).absolute()
    for src in sources:
        src = Path(src).resolve()
        if src == out.resolve() or out.resolve() in src.parents:
            raise FileExistsError(f"destination {out} contains the source {src}; an export "
                                  "never replaces its own source, choose another destination")
    if not out.exists():
        return out
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    present = _files(out)
    if not present:
        return out
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True "
                              "(--overwrite) to replace a previous export")
    listed: set[str] = set()
    if (out / MANIFEST).is_file():
        try:
            listed = set(json.loads((out / MANIFEST).read_text())["files"])
        except (ValueError, KeyError, TypeError):
            listed = set()
    foreign = [f for f in present if f not in listed and f != MANIFEST]
    if foreign:
        what = ("files that its export manifest does not list" if listed else
                f"files and no {MANIFEST} (it is not a previous cpmjax export)")
        raise FileExistsError(f"{out} holds {what}: {', '.join(foreign[:5])}"
                              f"{' ...' if len(foreign) > 5 else ''}; overwrite replaces only "
                              "previous exports, so nothing was changed. Move those files or "
                              "choose another destination")
    return out


def copy_tokenizer(tokenizer: str | os.PathLike | None, folder: Path) -> None:
    """Copy the tokenizer files next to ``tokenizer`` (a tokenizer.json or its folder)."""
    if tokenizer is None:
        return
    src = Path(tokenizer)
    src = src if src.is_dir() else src.parent
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)


def write_manifest(folder: Path, kind: str) -> None:
    """List every file of a finished export (inside its temporary folder, before the rename)."""
    (folder / MANIFEST).write_text(json.dumps({"written_by": "cpmjax", "format": kind,
                                               "files": _files(folder)}, indent=2) + "\n")
