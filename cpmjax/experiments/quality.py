"""UltraClean-style quality classifier (MiniCPM4 report, arXiv 2506.07900 §2.2): fastText trained
on seed positives and negatives, refined by iterative seed refresh.

Defaults are the report's: dim 256, lr 0.1, word n-grams 3, minCount 5, 3 epochs, keep a document
when P(high quality) >= 0.5. Preprocessing as the report describes it: redundant blank lines and
spaces dropped, diacritics stripped, lowercased, then tokenized (the report uses the DeepSeek-V2
tokenizer; here the project's own byte-level BPE, whose newline/tab/CR tokens keep ``\\n \\t \\r``),
one document per fastText line. Seed refresh: each round's confident predictions on an unlabeled
pool join the next round's positives and negatives, as the report trains its classifier.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpmjax.atomic import atomic_file

HQ, LQ = "__label__hq", "__label__lq"


@dataclasses.dataclass(frozen=True)
class FastTextParams:
    """fastText supervised settings; the report's values are the defaults. They are tuned for
    its billions of tokens: on a few hundred seed documents 3 epochs at lr 0.1 underfit (every
    score near 0.5); ``launch/filter_data.py``'s example passes more epochs and a higher lr."""

    dim: int = 256
    lr: float = 0.1
    word_ngrams: int = 3
    min_count: int = 5
    epoch: int = 3
    # not given by the report: fastText's default of 2M n-gram buckets at dim 256 is a 2 GB
    # model; 200K keeps it at ~200 MB
    bucket: int = 200_000
    threads: int = 1  # one thread: the same seeds give the same model
    seed: int = 0


def _strip_diacritics(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def normalize(text: str) -> str:
    """Blank-line runs to one, space runs to one, no diacritics, lowercase."""
    text = _strip_diacritics(text).lower()
    text = re.sub(r"[ \u00a0]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    return text.strip()


def preprocess(text: str, tokenizer: Any) -> str:
    """One fastText line: the normalized document's tokens, space separated."""
    return " ".join(tokenizer.encode(normalize(text), add_special_tokens=False).tokens)


def synthetic_negatives(docs: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """Low-quality text made from real documents: word salad, boilerplate and spam, keyword
    lists, markup debris and character noise (stand-ins for the raw web text the report uses as
    negatives, so the seeds need nothing downloaded). Not repetition: a bag of n-grams cannot
    see it (documents of one real line repeated scored >= 0.88 here); that is a rule's job."""
    rng = np.random.default_rng(seed)
    spam = ("click here", "buy now", "free shipping", "best price", "limited offer",
            "subscribe today", "cheap deals", "sign up", "100% free", "act now", "login",
            "cookie policy", "terms of service", "all rights reserved", "share this")
    out = []
    for i in range(n):
        words = docs[int(rng.integers(len(docs)))].split() or ["lorem"]
        kind = i % 5
        if kind == 0:  # word salad
            text = " ".join(rng.permutation(words)[:200])
        elif kind == 1:  # boilerplate and spam around a few words
            text = "\n".join(" | ".join(rng.choice(spam, 4)) + " " + " ".join(
                rng.choice(words, 3)) for _ in range(int(rng.integers(5, 15))))
        elif kind == 2:  # keyword list
            text = ", ".join(rng.choice(words, int(rng.integers(30, 80)))).upper()
        elif kind == 3:  # markup debris
            tags = ("div", "span", "li", "td", "a")
            text = "".join(f'<{t} class="c{int(rng.integers(99))}">{w}</{t}>'
                           for t, w in zip(rng.choice(tags, 60), rng.choice(words, 60)))
        else:  # character noise
            chars = list(" ".join(words[:150]))
            for j in rng.choice(len(chars), len(chars) // 4):
                chars[j] = chr(int(rng.integers(33, 127)))
            text = "".join(chars)
        out.append(text)
    return out


def corpus_paragraphs(cache_dir: str | os.PathLike, split: str = "train",
                      min_chars: int = 200) -> list[str]:
    """Paragraphs of the default corpus (real prose; the shipped positives)."""
    import json

    from cpmjax.data.corpus import build_default_corpus

    path = Path(build_default_corpus(cache_dir)) / f"{split}.jsonl"
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return [p.strip() for d in docs for p in d.split("\n\n") if len(p.strip()) >= min_chars]


def candidate_pool(real: Sequence[str], n: int, junk_share: float = 0.5, seed: int = 7
                   ) -> list[dict[str, str]]:
    """An unfiltered shard to try the filter and its verification on: ``n`` records (``text``,
    ``source`` = "real" or "generated"), ``junk_share`` of them `synthetic_negatives` of a seed
    the classifier's seeds do not use, the rest drawn from ``real``, shuffled."""
    if not real or n < 1 or not 0.0 <= junk_share <= 1.0:
        raise ValueError(f"a pool needs real documents, n >= 1 (got {n}) and junk_share in "
                         f"[0, 1] (got {junk_share})")
    rng = np.random.default_rng(seed)
    n_junk = int(round(n * junk_share))
    picks = rng.choice(len(real), n - n_junk, replace=n - n_junk > len(real))
    records = ([{"text": real[int(i)], "source": "real"} for i in picks] +
               [{"text": t, "source": "generated"} for t in
                synthetic_negatives(list(real), n_junk, seed)])
    return [records[int(i)] for i in rng.permutation(len(records))]


class QualityClassifier:
    """A trained fastText model scoring documents: P(high quality) in [0, 1]."""

    def __init__(self, path: str | os.PathLike, tokenizer: Any) -> None:
        import fasttext

        self.path, self.tokenizer = Path(path), tokenizer
        if not self.path.is_file():
            raise FileNotFoundError(f"no fastText model at {self.path}")
        self.model = fasttext.load_model(str(self.path))
        if set(self.model.labels) != {HQ, LQ}:
            raise ValueError(f"{self.path} is not a quality classifier (labels "
                             f"{self.model.labels}, expected {HQ} and {LQ})")

    def score(self, texts: Sequence[str]) -> np.ndarray:
        lines = [preprocess(t, self.tokenizer) for t in texts]
        labels, probs = self.model.predict(lines, k=2)
        return np.asarray([float(p[list(lab).index(HQ)]) if HQ in lab else 0.0
                           for lab, p in zip(labels, probs)], np.float64)


def train_classifier(positives: Sequence[str], negatives: Sequence[str],
                     out_path: str | os.PathLike, tokenizer: Any,
                     params: FastTextParams = FastTextParams()) -> QualityClassifier:
    """fastText on the seeds (shuffled by ``params.seed``), saved to ``out_path``."""
    if not positives or not negatives:
        raise ValueError(f"quality classifier needs positives and negatives, got "
                         f"{len(positives)} and {len(negatives)}")
    lines = [f"{HQ} {preprocess(t, tokenizer)}" for t in positives] + [
        f"{LQ} {preprocess(t, tokenizer)}" for t in negatives]
    order = np.random.default_rng(params.seed).permutation(len(lines))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        data = Path(tmp) / "train.txt"
        data.write_text("\n".join(lines[i] for i in order) + "\n", encoding="utf-8")
        tmp_model = Path(tmp) / "model.bin"
        _train_fasttext(data, tmp_model, params)
        with atomic_file(out, "wb") as f:
            f.write(tmp_model.read_bytes())
    return QualityClassifier(out, tokenizer)


# Trains in a fresh interpreter. In a process in which libtpu had compiled a TPU program (the
# test suite's AOT tests), fastText 0.9 (fasttext-numpy2) reported "Encountered NaN" on the same
# data, seed and single thread that train fine alone (lr 0.5, 25 epochs; seen 2026-12-07, cause
# inside the C++ library not found); a child process gives it a clean one.
_TRAIN_FASTTEXT = """
import json, sys
import fasttext
data, out, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
fasttext.train_supervised(data, verbose=0, **kw).save_model(out)
"""


def _train_fasttext(data: Path, out: Path, params: FastTextParams) -> None:
    kw = dict(dim=params.dim, lr=params.lr, wordNgrams=params.word_ngrams,
              minCount=params.min_count, epoch=params.epoch, bucket=params.bucket,
              thread=params.threads, seed=params.seed)
    done = subprocess.run([sys.executable, "-c", _TRAIN_FASTTEXT, str(data), str(out),
                           json.dumps(kw)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"fastText training failed: {done.stderr.strip().splitlines()[-1:]}")


def accuracy(clf: QualityClassifier, positives: Sequence[str], negatives: Sequence[str],
             threshold: float = 0.5) -> float:
    s = np.concatenate([clf.score(positives) >= threshold, clf.score(negatives) < threshold])
    return float(s.mean())


def train_iterative(positives: Sequence[str], negatives: Sequence[str], pool: Sequence[str],
                    out_path: str | os.PathLike, tokenizer: Any, rounds: int = 2,
                    per_round: int = 200, params: FastTextParams = FastTextParams(),
                    held_out: tuple[Sequence[str], Sequence[str]] | None = None
                    ) -> tuple[QualityClassifier, list[dict[str, Any]]]:
    """Seed refresh: train, score the unlabeled ``pool``, add its ``per_round`` highest-scored
    documents to the positives and its lowest-scored to the negatives, train again; ``rounds``
    trainings in all. Each round's size and held-out accuracy are returned."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    pos, neg, left = list(positives), list(negatives), list(pool)
    log = []
    for r in range(rounds):
        clf = train_classifier(pos, neg, out_path, tokenizer, params)
        entry: dict[str, Any] = {"round": r, "positives": len(pos), "negatives": len(neg)}
        if held_out is not None:
            entry["held_out_accuracy"] = accuracy(clf, *held_out)
        log.append(entry)
        if r == rounds - 1 or not left:
            break
        order = np.argsort(clf.score(left))
        k = min(per_round, len(left) // 2)
        pos += [left[i] for i in order[len(order) - k:]]
        neg += [left[i] for i in order[:k]]
        chosen = set(order[:k].tolist()) | set(order[len(order) - k:].tolist())
        left = [d for i, d in enumerate(left) if i not in chosen]
    return clf, log


def build_classifier(out_path: str | os.PathLike, tokenizer: Any, cache_dir: str | os.PathLike,
                     positives: Sequence[str] = (), negatives: Sequence[str] = (),
                     pool: Sequence[str] = (), rounds: int = 2, per_round: int = 200,
                     params: FastTextParams = FastTextParams(), held_out_every: int = 10
                     ) -> tuple[QualityClassifier, list[dict[str, Any]]]:
    """The classifier from seeds, with defaults for what is not given: positives = the default
    corpus's training paragraphs, negatives = as many `synthetic_negatives`, pool = the corpus's
    held-out paragraphs and synthetic negatives of another seed. Every ``held_out_every``-th
    seed is held out to measure each round; the log is also written next to the model."""
    from cpmjax.atomic import write_json

    pos = list(positives) or corpus_paragraphs(cache_dir, "train")
    neg = list(negatives) or synthetic_negatives(pos, len(pos), params.seed)
    if not pool and not positives:
        valid = corpus_paragraphs(cache_dir, "valid")
        pool = valid + synthetic_negatives(valid, len(valid), params.seed + 1)
    split = lambda xs: ([x for i, x in enumerate(xs) if i % held_out_every],
                        xs[::held_out_every])
    (pos_train, pos_held), (neg_train, neg_held) = split(pos), split(neg)
    clf, log = train_iterative(pos_train, neg_train, list(pool), out_path, tokenizer, rounds,
                               per_round, params, held_out=(pos_held, neg_held))
    write_json(Path(out_path).with_suffix(".json"), {"params": dataclasses.asdict(params),
                                                     "rounds": log})
    return clf, log
