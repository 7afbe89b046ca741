"""UltraClean-style data filtering (MiniCPM4 report, arXiv 2506.07900 §2.2).

Train the fastText quality classifier (seeds: the default corpus as positives and generated
low-quality text as negatives unless files are given; ``--rounds`` of seed refresh):

    python launch/filter_data.py --action=train --model=runs/quality/quality.bin \\
        --epoch=25 --lr=0.5

Score JSONL / ArrayRecord shards in parallel and write the filtered shards, scores, a summary
and a score histogram:

    python launch/filter_data.py --action=filter --model=runs/quality/quality.bin \\
        --shards=data/a.jsonl,data/b.arrayrecord --out=data/filtered --workers=2

An unfiltered shard to try them on (corpus paragraphs and generated low-quality text, half each,
every record tagged with its ``source``):

    python launch/filter_data.py --action=pool --out=data/pool.jsonl --pool_docs=2000

Efficient verification: anneal a pre-trained run on 30% candidate / 70% default data next to the
default mix alone, one variant per candidate set (``NAME=FILE[+FILE...]``; one study, one table
of held-out loss and indicator):

    python launch/filter_data.py --action=verify --pretrained=runs/tiny \
        --candidates=raw=data/pool.jsonl,filtered=data/filtered/pool.jsonl \
        --anneal_steps=100 --out=runs/verify/pool

fastText settings default to the report's (dim 256, lr 0.1, wordNgrams 3, minCount 5, 3 epochs,
threshold 0.5); with a few hundred seeds 3 epochs at lr 0.1 underfit, hence the example's flags.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from absl import app, flags

from cpmjax.data import read_documents
from cpmjax.data.tokenizer import get_or_build_default_tokenizer, load_tokenizer
from cpmjax.experiments.filtering import filter_shards, shard_type
from cpmjax.atomic import write_text
from cpmjax.experiments.quality import (FastTextParams, build_classifier, candidate_pool,
                                        corpus_paragraphs)
from cpmjax.experiments.runner import run_study
from cpmjax.experiments.verify_data import candidate_sets, verification_study

_ACTION = flags.DEFINE_enum("action", None, ["train", "filter", "pool", "verify"], "what to do")
_MODEL = flags.DEFINE_string("model", "runs/quality/quality.bin", "fastText model path")
_POS = flags.DEFINE_list("positives", [], "JSONL/ArrayRecord files of positive seeds")
_NEG = flags.DEFINE_list("negatives", [], "files of negative seeds")
_POOL = flags.DEFINE_list("pool", [], "unlabeled files for seed refresh")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "training rounds (seed refresh between them)")
_PER_ROUND = flags.DEFINE_integer("per_round", 200, "pool documents added per class per round")
_DIM = flags.DEFINE_integer("dim", 256, "fastText dim")
_LR = flags.DEFINE_float("lr", 0.1, "fastText lr")
_NGRAMS = flags.DEFINE_integer("word_ngrams", 3, "fastText wordNgrams")
_MIN_COUNT = flags.DEFINE_integer("min_count", 5, "fastText minCount")
_EPOCH = flags.DEFINE_integer("epoch", 3, "fastText epochs")
_BUCKET = flags.DEFINE_integer("bucket", 200_000, "fastText n-gram buckets")
_SEED = flags.DEFINE_integer("seed", 0, "seed (shuffling, generated negatives)")
_SHARDS = flags.DEFINE_list("shards", [], "shards to filter (.jsonl / .arrayrecord)")
_OUT = flags.DEFINE_string("out", None, "filter: output folder; verify: study folder")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "keep documents with P(high quality) >= this")
_WORKERS = flags.DEFINE_integer("workers", 2, "grain worker processes")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output folder")
_PRETRAINED = flags.DEFINE_string("pretrained", "runs/tiny", "verify: the pre-trained run")
_CANDIDATES = flags.DEFINE_list("candidates", [], "verify: candidate sets, NAME=FILE[+FILE...] "
                                "(JSONL) or FILE (named after it), one variant each")
_POOL_DOCS = flags.DEFINE_integer("pool_docs", 2000, "pool: documents in the shard")
_SHARE = flags.DEFINE_float("share", 0.3, "verify: candidate share of the annealing mix")
_ANNEAL = flags.DEFINE_integer("anneal_steps", 100, "verify: annealing steps")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "verify: seeds of both variants")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer folder (default: the project's)")
_CACHE = flags.DEFINE_string("cache_dir", ".cache/cpmjax", "corpus/tokenizer cache")


def _docs(files: list[str]) -> list[str]:
    """Documents of seed files: .txt (one document each), .jsonl, .arrayrecord."""
    return [d for f in files for d in read_documents(
        f, "text" if f.endswith(".txt") else shard_type(Path(f)))]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tok_dir = _TOKENIZER.value or str(get_or_build_default_tokenizer(_CACHE.value, 4096))
    if _ACTION.value == "train":
        params = FastTextParams(_DIM.value, _LR.value, _NGRAMS.value, _MIN_COUNT.value,
                                _EPOCH.value, _BUCKET.value, seed=_SEED.value)
        _, log = build_classifier(_MODEL.value, load_tokenizer(tok_dir), _CACHE.value,
                                  _docs(_POS.value), _docs(_NEG.value), _docs(_POOL.value),
                                  _ROUNDS.value, _PER_ROUND.value, params)
        for r in log:
            print(json.dumps(r))
        print(f"classifier: {_MODEL.value}")
    elif _ACTION.value == "filter":
        if not _SHARDS.value or not _OUT.value:
            raise app.UsageError("--action=filter needs --shards and --out")
        summary = filter_shards(_SHARDS.value, _MODEL.value, tok_dir, _OUT.value,
                                _THRESHOLD.value, _WORKERS.value, overwrite=_OVERWRITE.value)
        print(json.dumps({k: v for k, v in summary.items() if k != "shards"}))
        print(f"filtered shards, scores.jsonl, summary.json, score_histogram.png in {_OUT.value}")
    elif _ACTION.value == "pool":
        if not _OUT.value:
            raise app.UsageError("--action=pool needs --out (the JSONL file to write)")
        records = candidate_pool(corpus_paragraphs(_CACHE.value, "train"), _POOL_DOCS.value,
                                 seed=_SEED.value + 7)
        write_text(_OUT.value, "".join(json.dumps(r) + "\n" for r in records))
        print(f"{len(records)} documents in {_OUT.value}")
    elif _ACTION.value == "verify":
        if not _OUT.value:
            raise app.UsageError("--action=verify needs --out (the study folder)")
        study = verification_study(_PRETRAINED.value, candidate_sets(_CANDIDATES.value),
                                   share=_SHARE.value,
                                   steps=_ANNEAL.value, seeds=[int(s) for s in _SEEDS.value])
        run_study(study, _OUT.value, command=shlex.join(["python", *sys.argv]))
        print((Path(_OUT.value) / "summary.md").read_text())
    else:
        raise app.UsageError("--action is required: train, filter, pool or verify")


if __name__ == "__main__":
    app.run(main)
