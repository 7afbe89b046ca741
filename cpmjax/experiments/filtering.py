"""Filter data shards with the quality classifier: every JSONL or ArrayRecord shard scored in
parallel through grain (one shard per element, ``mp_prefetch`` worker processes, each loading the
fastText model once), the documents at or above the threshold written to a filtered shard of the
same format, plus per-document scores, a summary and a score histogram PNG.

The output folder appears whole (``cpmjax.atomic.atomic_dir``) and an existing one is never
replaced unless asked. JSONL records keep all their fields, with ``quality_score`` added.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpmjax.atomic import atomic_dir, atomic_file, write_json
from cpmjax.data.sources import DataError, read_documents, read_jsonl_records
from cpmjax.plotting import pyplot, save_png

_CLASSIFIERS: dict[tuple[str, str], Any] = {}  # per worker process: (model, tokenizer) -> loaded


def shard_type(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix in (".arrayrecord", ".array_record"):
        return "arrayrecord"
    raise DataError(f"{path}: a shard must be .jsonl or .arrayrecord")


def _read_records(path: Path, text_field: str) -> tuple[list[Any], list[str]]:
    """(records as they are stored, their texts); errors name the file and line."""
    if shard_type(path) == "arrayrecord":
        texts = read_documents(path, "arrayrecord")
        return texts, texts
    records = read_jsonl_records(path, text_field)
    return records, [r[text_field] for r in records]


def _classifier(model_path: str, tokenizer_path: str) -> Any:
    key = (model_path, tokenizer_path)
    if key not in _CLASSIFIERS:
        from cpmjax.data.tokenizer import load_tokenizer
        from cpmjax.experiments.quality import QualityClassifier

        _CLASSIFIERS[key] = QualityClassifier(model_path, load_tokenizer(tokenizer_path))
    return _CLASSIFIERS[key]


class _ScoreShard:
    """grain map: score one shard and write its filtered copy into the output folder."""

    def __init__(self, model_path: str, tokenizer_path: str, out_dir: str, threshold: float,
                 text_field: str) -> None:
        self.args = (model_path, tokenizer_path)
        self.out_dir, self.threshold, self.text_field = Path(out_dir), threshold, text_field

    def __call__(self, path: str) -> dict[str, Any]:
        src = Path(path)
        records, texts = _read_records(src, self.text_field)
        scores = _classifier(*self.args).score(texts) if texts else np.zeros(0)
        keep = scores >= self.threshold
        dst = self.out_dir / src.name
        if shard_type(src) == "jsonl":
            with atomic_file(dst) as f:
                for rec, s, k in zip(records, scores, keep):
                    if k:
                        f.write(json.dumps({**rec, "quality_score": round(float(s), 6)}) + "\n")
        else:
            from array_record.python.array_record_module import ArrayRecordWriter

            writer = ArrayRecordWriter(str(dst), "group_size:1")
            for text, k in zip(texts, keep):
                if k:
                    writer.write(text.encode("utf-8"))
            writer.close()
        return {"shard": str(src), "output": dst.name, "documents": len(texts),
                "kept": int(keep.sum()), "scores": [round(float(s), 6) for s in scores]}


def filter_shards(shards: Sequence[str | os.PathLike], model_path: str | os.PathLike,
                  tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
                  threshold: float = 0.5, workers: int = 2, text_field: str = "text",
                  overwrite: bool = False) -> dict[str, Any]:
    """Score and filter ``shards`` into ``out_dir``; the summary (also ``summary.json``)."""
    paths = [Path(s) for s in shards]
    if not paths:
        raise DataError("no shards to filter")
    names = [p.name for p in paths]
    for p in paths:
        shard_type(p)
        if not p.is_file():
            raise DataError(f"shard {p} does not exist")
    if len(set(names)) != len(names):
        raise DataError(f"shards must have distinct file names (they keep them): {names}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in [0, 1]")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite to replace it")
    import grain

    with atomic_dir(out) as tmp:
        ds = grain.MapDataset.source([str(p.absolute()) for p in paths]).map(_ScoreShard(
            str(Path(model_path).absolute()), str(Path(tokenizer_path).absolute()), str(tmp),
            threshold, text_field)).to_iter_dataset()
        if workers > 1:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags;
                flags.FLAGS.mark_as_parsed()  # outside an absl app they keep their defaults
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        per_shard = list(ds)
        all_scores = np.concatenate([np.asarray(s["scores"]) for s in per_shard])
        summary = {"threshold": threshold, "classifier": str(model_path),
                   "documents": int(all_scores.size), "kept": int((all_scores >= threshold).sum()),
                   "shards": [{k: v for k, v in s.items() if k != "scores"} for s in per_shard]}
        with atomic_file(tmp / "scores.jsonl") as f:
            for s in per_shard:
                for i, v in enumerate(s["scores"]):
                    f.write(json.dumps({"shard": s["output"], "index": i, "score": v}) + "\n")
        write_json(tmp / "summary.json", summary)
        plot_histogram(all_scores, threshold, tmp / "score_histogram.png")
    return summary


def plot_histogram(scores: np.ndarray, threshold: float, path: Path) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.hist(scores, bins=np.linspace(0, 1, 41), color="C0")
    ax.axvline(threshold, color="C3", linestyle="--", label=f"threshold {threshold:g}")
    kept = int((scores >= threshold).sum())
    ax.set(xlabel="P(high quality)", ylabel="documents",
           title=f"quality scores: {kept} of {scores.size} documents kept")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
    return path
