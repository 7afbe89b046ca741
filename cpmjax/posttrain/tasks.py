"""A verifiable instruction set that the project generates itself, offline and deterministically.

Every example is one short instruction with one answer a program can check, so supervised
fine-tuning (``cpmjax.posttrain.sft``), RL rewards and evaluation all use the same data and the
same judge. Families (``FAMILIES``; prompts are fixed phrasings, answers contain nothing else):

===========  ==========================================  ===========  =======================
family       prompt                                      answer       check
===========  ==========================================  ===========  =======================
copy         ``Repeat: k d t m``                         ``k d t m``  exact
reverse      ``Reverse: k d t m``                        ``m t d k``  exact
sort         ``Sort: 7 3 9 1``                           ``1 3 7 9``  exact
count        ``How many letters: k d t m``               ``4``        integer
lookup       ``a=3 k=7 u=1. What is k?``                 ``7``        exact
arithmetic   ``What is 23 + 58?`` (+ and -)              ``81``       integer
convert      ``Convert 250 g to kg.``                    ``0.25``     number, rel. tol. 1e-6
===========  ==========================================  ===========  =======================

One more family is opt-in (``EXTRA_FAMILIES``: named in ``families``, never in the default set,
so the default set and everything trained on it stay as they were):

===========  ==========================================  ===========  =======================
echo         ``Echo: k k d t`` (2-96 letters, repeats)   ``k k d t``  exact
===========  ==========================================  ===========  =======================

``echo`` gives a long-tailed response length, the case chunk-wise rollout is for (MiniCPM4
report, arXiv 2506.07900 §3.2: a few long responses hold up a whole rollout step): 70% of its
problems have 2-6 letters, the rest a log-uniform 8-96, so a mix with the default families has
a median response of a few tokens and a tail to about 100.

They are sized for the tiny model (4 layers, width 128, the project's 4096-token tokenizer):
single-letter and single-digit items, 3-6 of them, numbers below 100. ``copy``, ``reverse``,
``sort``, ``count`` and ``lookup`` are algorithms over items the tokenizer keeps as one token each,
so held-out problems test the algorithm, not memory; ``arithmetic`` and ``convert`` need facts.

Example schema (a JSON-able dict, one per JSONL line)::

    {"id": "lookup-3f2a9c1e", "family": "lookup", "split": "train",
     "messages": [{"role": "user", "content": "a=3 k=7 u=1. What is k?"},
                  {"role": "assistant", "content": "7"}],
     "answer": "7"}

``messages`` is a whole conversation in the OpenAI format, the reference answer as the final
assistant turn (SFT trains on it as is); :func:`prompt_messages` drops that turn for generation.

Splits: whether a problem is held out is a function of the problem alone (a hash of family and
prompt; 1 in ``HELDOUT_EVERY``), so ``train`` and ``heldout`` never share a problem whatever the
seeds and sizes. The same ``(split, n, seed, families)`` always gives the same list; held-out
lists have no repeated problem.

Judging: :func:`check` takes the model's text (as generated: a leading ``<think>...</think>`` block
and anything from ``<|im_end|>`` / ``</s>`` on are ignored; surrounding whitespace too), requires it
to be *only* an answer of the family's format (:func:`well_formed`) and compares it with the
reference: exact string match, integer equality, or relative tolerance. :func:`reward` is 1.0 or
0.0 (a malformed answer scores 0, as MiniCPM4's RL rewards do: report arXiv 2506.07900 §3.2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from cpmjax.atomic import atomic_file

Example = dict[str, Any]
Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_EVERY = 5
VERSION = 1  # bump when a family's generator changes: cached sets are keyed by it
# ' q' is two tokens of the project tokenizer; every other ' x' is one
LETTERS = string.ascii_lowercase.replace("q", "")
_INT = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_ENDS = ("<|im_end|>", "</s>")

Check = Literal["exact", "integer", "number"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One task family: a generator of (prompt, answer) from a numpy Generator, and its judge."""

    name: str
    make: Callable[[np.random.Generator], tuple[str, str]]
    check: Check
    pattern: re.Pattern  # the whole answer must match it (format check)
    rel_tol: float = 0.0


def _letters(rng: np.random.Generator, lo: int = 3, hi: int = 6) -> list[str]:
    return list(rng.choice(list(LETTERS), size=int(rng.integers(lo, hi + 1)), replace=False))


def _digits(rng: np.random.Generator, lo: int = 3, hi: int = 6) -> list[str]:
    return [str(d) for d in rng.integers(0, 10, size=int(rng.integers(lo, hi + 1)))]


def _copy(rng: np.random.Generator) -> tuple[str, str]:
    items = " ".join(_letters(rng))
    return f"Repeat: {items}", items


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
    items = _letters(rng)
    return f"Reverse: {' '.join(items)}", " ".join(reversed(items))


def _sort(rng: np.random.Generator) -> tuple[str, str]:
    items = _digits(rng)
    return f"Sort: {' '.join(items)}", " ".join(sorted(items))


def _count(rng: np.random.Generator) -> tuple[str, str]:
    items = _letters(rng, 2, 7)
    return f"How many letters: {' '.join(items)}", str(len(items))


def _lookup(rng: np.random.Generator) -> tuple[str, str]:
    keys = _letters(rng, 3, 5)
    values = [str(v) for v in rng.choice(10, size=len(keys), replace=False)]  # one answer
    asked = int(rng.integers(len(keys)))
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"{pairs}. What is {keys[asked]}?", values[asked]


def _arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    if rng.integers(2):
        return f"What is {a} + {b}?", str(a + b)
    return f"What is {a} - {b}?", str(a - b)


# (big unit, small unit, small units per big unit)
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("l", "ml", 1000),
         ("h", "min", 60), ("min", "s", 60))


def format_number(x: float) -> str:
    """Shortest plain decimal of a number with at most 6 decimals (``250.0`` -> ``250``)."""
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _convert(rng: np.random.Generator) -> tuple[str, str]:
    big, small, factor = UNITS[int(rng.integers(len(UNITS)))]
    if rng.integers(2):  # big -> small: an integer
        x = int(rng.integers(1, 20))
        return f"Convert {x} {big} to {small}.", str(x * factor)
    step = 6 if factor == 60 else 1  # keeps x / 60 a one-decimal number
    y = step * int(rng.integers(1, 1000 // step))
    return f"Convert {y} {small} to {big}.", format_number(y / factor)


def _echo(rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < 0.7:
        n = int(rng.integers(2, 7))
    else:
        n = int(round(float(np.exp(rng.uniform(np.log(8), np.log(96))))))
    items = " ".join(rng.choice(list(LETTERS), size=n))
    return f"Echo: {items}", items


_SEQ = lambda item: re.compile(rf"{item}( {item})*")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("copy", _copy, "exact", _SEQ("[a-z]")),
    Family("reverse", _reverse, "exact", _SEQ("[a-z]")),
    Family("sort", _sort, "exact", _SEQ("[0-9]")),
    Family("count", _count, "integer", _INT),
    Family("lookup", _lookup, "exact", re.compile("[0-9]")),
    Family("arithmetic", _arithmetic, "integer", _INT),
    Family("convert", _convert, "number", _NUMBER, rel_tol=1e-6),
)}
EXTRA_FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("echo", _echo, "exact", _SEQ("[a-z]")),
)}
KNOWN_FAMILIES: dict[str, Family] = FAMILIES | EXTRA_FAMILIES


def problem_split(family: str, prompt: str) -> Split:
    """The split a problem belongs to, from the problem alone."""
    digest = hashlib.sha256(f"{family}\n{prompt}".encode()).hexdigest()
    return "heldout" if int(digest[:8], 16) % HELDOUT_EVERY == 0 else "train"


def _example(family: str, split: str, prompt: str, answer: str) -> Example:
    digest = hashlib.sha256(f"{family}\n{prompt}".encode()).hexdigest()[:8]
    return {"id": f"{family}-{digest}", "family": family, "split": split,
            "messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}],
            "answer": answer}


def parse_families(text: str) -> list[str] | None:
    """Family names from a comma-separated config string; None (the default set) when empty."""
    return [f.strip() for f in text.split(",") if f.strip()] or None


def _family_names(families: Iterable[str] | None) -> list[str]:
    names = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in names if f not in KNOWN_FAMILIES]
    if unknown or not names:
        raise ValueError(f"families must be a non-empty subset of {sorted(KNOWN_FAMILIES)}, "
                         f"got {names}")
    return names


def generate(split: Split, n: int, seed: int = 0,
             families: Iterable[str] | None = None) -> list[Example]:
    """``n`` examples of ``split``, the families taking turns (example i is of family
    ``families[i % len(families)]``); the same arguments always give the same list."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = _family_names(families)
    per_family = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
    columns = []
    for name, count in zip(names, per_family):
        index = list(KNOWN_FAMILIES).index(name)
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))
        columns.append(_draw(KNOWN_FAMILIES[name], split, count, rng))
    return [columns[i % len(names)][i // len(names)] for i in range(n)]


def _draw(family: Family, split: str, count: int, rng: np.random.Generator) -> list[Example]:
    out, seen = [], set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise ValueError(f"family {family.name!r} has fewer than {count} distinct {split} "
                             f"problems (found {len(out)})")
        prompt, answer = family.make(rng)
        if problem_split(family.name, prompt) != split:
            continue
        if split == "heldout":
            if prompt in seen:
                continue
            seen.add(prompt)
        out.append(_example(family.name, split, prompt, answer))
    return out


def prompt_messages(example: Example) -> list[dict[str, str]]:
    """The conversation without its reference answer (what a model is asked)."""
    messages = example["messages"]
    return [dict(m) for m in (messages[:-1] if messages[-1]["role"] == "assistant"
                              else messages)]


def answer_text(text: str) -> str:
    """The answer part of a model's output: no leading thinking block, nothing from an end token
    on, no surrounding whitespace."""
    for end in _ENDS:
        text = text.split(end, 1)[0]
    return _THINK.sub("", text, count=1).strip()


def _family_of(example: Example) -> Family:
    name = example.get("family")
    if name not in KNOWN_FAMILIES:
        raise ValueError(f"example {example.get('id')!r} has unknown family {name!r} "
                         f"(expected one of {sorted(KNOWN_FAMILIES)})")
    return KNOWN_FAMILIES[name]


def well_formed(example: Example, text: str) -> bool:
    """Whether the output is nothing but an answer in the family's format."""
    return _family_of(example).pattern.fullmatch(answer_text(text)) is not None


def check(example: Example, text: str) -> bool:
    """Whether ``text`` (a model's output) is a well-formed, correct answer to ``example``."""
    family, got = _family_of(example), answer_text(text)
    if family.pattern.fullmatch(got) is None:
        return False
    want = str(example["answer"])
    if family.check == "exact":
        return got == want
    if family.check == "integer":
        return int(got) == int(want)
    return math.isclose(float(got), float(want), rel_tol=family.rel_tol, abs_tol=1e-9)


def reward(example: Example, text: str) -> float:
    """1.0 for a well-formed correct answer, else 0.0 (a verifiable reward for RL)."""
    return 1.0 if check(example, text) else 0.0


def accuracy(examples: Sequence[Example], outputs: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy overall and per family, and the share of well-formed outputs."""
    if len(examples) != len(outputs):
        raise ValueError(f"{len(examples)} examples but {len(outputs)} outputs")
    by_family: dict[str, list[bool]] = {}
    formed = 0
    for ex, out in zip(examples, outputs):
        by_family.setdefault(ex["family"], []).append(check(ex, out))
        formed += well_formed(ex, out)
    hits = [h for v in by_family.values() for h in v]
    return {"accuracy": sum(hits) / max(len(hits), 1), "well_formed": formed / max(len(hits), 1),
            "n": len(hits),
            "by_family": {k: sum(v) / len(v) for k, v in sorted(by_family.items())}}


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> Path:
    """One example per line, written atomically."""
    with atomic_file(path) as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return Path(path)


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples written by :func:`write_jsonl` (each must name a known family)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                ex = json.loads(line)
                if not isinstance(ex, dict) or ex.get("family") not in KNOWN_FAMILIES:
                    raise ValueError(f"{path}:{lineno}: not an instruction-set example")
                out.append(ex)
    return out


def build_instruct_set(cache_dir: str | os.PathLike, n_train: int = 20000,
                       n_heldout: int = 700, seed: int = 0,
                       families: Sequence[str] | None = None) -> Path:
    """Folder with ``train.jsonl`` and ``heldout.jsonl`` (built once, keyed by the generator
    version, sizes, seed and families), the files SFT configs train and evaluate on."""
    names = _family_names(families)
    tag = "" if families is None else "-" + "+".join(names)
    out = Path(cache_dir) / f"instruct-v{VERSION}-{n_train}-{n_heldout}-s{seed}{tag}"
    if not ((out / "train.jsonl").is_file() and (out / "heldout.jsonl").is_file()):
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "heldout.jsonl", generate("heldout", n_heldout, seed, names))
        write_jsonl(out / "train.jsonl", generate("train", n_train, seed, names))
    return out
