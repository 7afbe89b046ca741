"""RULER/NIAH-style synthetic long-context tasks, generated offline with a tokenizer.

Tasks (after RULER, Hsieh et al. 2024, arXiv:2404.06654, §3; templates are this project's):

- ``niah_single``: one "special magic number" needle for a key, asked for at the end;
- ``niah_multikey``: the same with needles for other keys around it (distractors);
- ``niah_multivalue``: several numbers for one key, all of them asked for;
- ``variable_tracking``: a chain ``VAR A = 123456. ... VAR B = VAR A. ...``; every variable that
  holds the number is asked for;
- ``positional_bias``: ``niah_single`` over many answer positions (11 relative depths by default),
  the sweep of where in the context the answer sits (LongPiBench, Tian et al. 2025,
  arXiv:2502.14334).

A sample is built at the token level so its length is exact: filler prose (the default corpus's
held-out split, real text) cut to fit, needles inserted at sentence boundaries nearest to their
depth (0 = the start of the context, 1 = just before the question), then the question, whose
answer the model continues. Everything is a function of (task, length, depth, index, seed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpmjax.data.tokenizer import BOS_ID

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
         "positional_bias")
BIAS_DEPTHS = tuple(round(i / 10, 1) for i in range(11))
_ADJ = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
        "keen", "lunar", "mellow", "noble", "olive", "plain", "quiet", "rustic", "silver",
        "tidal", "upper", "vivid", "woolen", "young")
_NOUN = ("anchor", "badger", "canyon", "dagger", "ember", "falcon", "garden", "harbor", "island",
         "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry",
         "river", "saddle", "tunnel", "valley", "walnut", "yonder", "zephyr")
_VARS = tuple("ABCDEFGHJKLMNPQRSTUVWXYZ")
# new tokens generated for the answer (a 6-digit number is 2-4 tokens of the project tokenizer)
ANSWER_BUDGET = {"niah_single": 12, "niah_multikey": 12, "positional_bias": 12,
                 "niah_multivalue": 36, "variable_tracking": 16}


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    length: int  # prompt tokens
    depth: float  # relative position of the answer's needle
    tokens: list[int]
    answers: tuple[str, ...]  # every one must appear in the model's continuation
    max_new_tokens: int


class Haystack:
    """Filler token stream with its sentence boundaries (positions after a '.' or newline)."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], min_tokens: int) -> None:
        ids: list[int] = []
        for text in texts:
            ids += tokenizer.encode(text + "\n", add_special_tokens=False).ids
            if len(ids) >= min_tokens:
                break
        if not ids:
            raise ValueError("no filler text for the haystack")
        while len(ids) < min_tokens:  # a short corpus repeats
            ids += ids
        self.ids = np.asarray(ids, np.int64)
        pieces = [tokenizer.id_to_token(int(i)) or "" for i in range(tokenizer.get_vocab_size())]
        ends = np.asarray(["." in p or "Ċ" in p or "\n" in p for p in pieces])
        self.boundary = np.flatnonzero(ends[self.ids]) + 1


def corpus_haystack(tokenizer: Any, cache_dir: str, max_length: int) -> Haystack:
    """Filler from the default corpus's held-out split (built on first use)."""
    from cpmjax.data.corpus import build_default_corpus

    valid = Path(build_default_corpus(cache_dir)) / "valid.jsonl"
    texts = [json.loads(line)["text"] for line in valid.read_text().splitlines() if line.strip()]
    return Haystack(tokenizer, texts, max_length)


def _key(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
        if k not in taken:
            taken.add(k)
            return k


def _number(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        v = str(int(rng.integers(100_000, 1_000_000)))
        if v not in taken:
            taken.add(v)
            return v


def _needles(task: str, rng: np.random.Generator, depth: float
             ) -> tuple[list[tuple[float, str]], str, tuple[str, ...], int]:
    """(depth, sentence) needles, the question, its answers and the generation budget."""
    keys: set[str] = set()
    nums: set[str] = set()
    if task in ("niah_single", "positional_bias", "niah_multikey"):
        key, value = _key(rng, keys), _number(rng, nums)
        needles = [(depth, f"One of the special magic numbers for {key} is: {value}.")]
        if task == "niah_multikey":
            needles += [(float(rng.uniform()), f"One of the special magic numbers for "
                         f"{_key(rng, keys)} is: {_number(rng, nums)}.") for _ in range(3)]
        q = (f"What is the special magic number for {key} mentioned in the provided text? The "
             f"special magic number for {key} mentioned in the provided text is")
        return needles, q, (value,), ANSWER_BUDGET[task]
    if task == "niah_multivalue":
        key = _key(rng, keys)
        values = [_number(rng, nums) for _ in range(3)]
        spots = [depth] + [float(rng.uniform()) for _ in values[1:]]
        needles = [(d, f"One of the special magic numbers for {key} is: {v}.")
                   for d, v in zip(spots, values)]
        q = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
             f"The special magic numbers for {key} mentioned in the provided text are")
        return needles, q, tuple(values), ANSWER_BUDGET[task]
    if task == "variable_tracking":
        value = _number(rng, nums)
        names = [str(v) for v in rng.choice(_VARS, 4, replace=False)]
        spots = np.linspace(depth, depth + (1 - depth) * 0.9, len(names)).tolist()
        needles = [(spots[0], f"VAR {names[0]} = {value}.")] + [
            (spots[i], f"VAR {names[i]} = VAR {names[i - 1]}.") for i in range(1, len(names))]
        q = (f"Find all variables that are assigned the value {value} in the text above. "
             f"Answer: According to the chain of variable assignments in the text above, "
             f"{len(names)} variables are assigned the value {value}, they are:")
        return needles, q, tuple(names), ANSWER_BUDGET[task]
    raise ValueError(f"unknown long-context task {task!r} (expected one of {TASKS})")


def make_sample(task: str, tokenizer: Any, haystack: Haystack, length: int, depth: float,
                index: int, seed: int = 0) -> Sample:
    """One prompt of exactly ``length`` tokens (bos included) with its answers."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} must be in [0, 1]")
    rng = np.random.default_rng([seed, TASKS.index(task), length, int(depth * 1000), index])
    needles, question, answers, budget = _needles(task, rng, depth)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids
    needle_ids = [(d, enc(" " + s + "\n")) for d, s in needles]
    q_ids = enc("\n" + question)
    fill = length - 1 - len(q_ids) - sum(len(n) for _, n in needle_ids)
    if fill < 16:
        raise ValueError(f"length {length} leaves no room for filler in task {task}")
    start = int(rng.integers(0, max(1, len(haystack.ids) - fill)))
    filler = haystack.ids[start:start + fill].tolist()
    bounds = haystack.boundary[(haystack.boundary > start) & (haystack.boundary <= start + fill)]
    bounds = np.concatenate([[0], bounds - start, [fill]])
    pieces, prev = [], 0
    for d, ids in sorted(needle_ids, key=lambda x: x[0]):
        cut = int(bounds[np.argmin(np.abs(bounds - d * fill))])
        cut = max(cut, prev)
        pieces += filler[prev:cut] + ids
        prev = cut
    tokens = [BOS_ID] + pieces + filler[prev:] + q_ids
    assert len(tokens) == length, (len(tokens), length)
    return Sample(task, length, depth, tokens, answers, budget)


def score(sample: Sample, text: str) -> float:
    """Fraction of the sample's answers found in the continuation (RULER's string match)."""
    found = [a for a in sample.answers if _contains_word(text, a)]
    return len(found) / len(sample.answers)


def _contains_word(text: str, answer: str) -> bool:
    """``answer`` as a whole word (so "12345" does not match inside "9123456")."""
    i = text.find(answer)
    while i >= 0:
        before = text[i - 1] if i else " "
        after = text[i + len(answer)] if i + len(answer) < len(text) else " "
        if not before.isalnum() and not after.isalnum():
            return True
        i = text.find(answer, i + 1)
    return False
