"""Constrained decoding: a per-request matcher that writes the allowed-token bitmask of each step,
over the grammar engine outlines-core (github.com/dottxt-ai/outlines-core).

Why outlines-core and not xgrammar (both maintained, both used by vLLM): measured on this 2-core
CPU with the project's 4096-token byte-level tokenizer, xgrammar compiles a JSON schema in 2 ms and
fills a mask in ~1.5 us against outlines-core's 28 ms and ~120 us, but xgrammar 0.2.9 requires
torch, transformers and triton (a 286 MB wheel; on a fresh machine its torch requirement alone
would pull a CUDA build), and its import takes 8 s. outlines-core is a 2.3 MB wheel with no
dependencies that imports in 20 ms; its per-step cost is reported by ``launch/bench.py decode``
(``constrained`` rows). Its JSON-schema-to-regex compiler has no bounded form of
``{"type": "object"}`` (the regex of an arbitrary object took 15-22 s to index with 4096 tokens),
so ``json_object`` uses ``JSON_OBJECT_SCHEMA``: an object whose values are scalars, arrays of
scalars, or objects of those (any JSON object a client gets is still valid JSON; deeper nesting is
what it cannot produce).

The mask layout is the one outlines-core and xgrammar write: bit ``t % 32`` of 32-bit word
``t // 32`` allows token t. Token bytes come from ``cpmjax.serve.detokenize.TokenTable``, so the
project's byte-level tokenizer and SentencePiece-style (metaspace, byte fallback) MiniCPM
tokenizers both work. Compiled indexes are cached per (grammar, end token).
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any

import numpy as np
from outlines_core import Guide, Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema

from cpmjax.serve.detokenize import TokenTable

_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"},
                     {"type": "null"}]}
_FLAT = {"anyOf": [*_SCALAR["anyOf"], {"type": "array", "items": _SCALAR}]}
JSON_OBJECT_SCHEMA = {"type": "object", "additionalProperties": {"anyOf": [
    *_FLAT["anyOf"], {"type": "object", "additionalProperties": _FLAT}]}}


class GrammarError(ValueError):
    """A grammar (JSON schema, regex) that the engine cannot compile; the message says why."""


class Grammars:
    """Compiles and caches grammars for one tokenizer and vocabulary size."""

    def __init__(self, table: TokenTable, vocab_size: int, cache_size: int = 32) -> None:
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        self._entries: dict[bytes, list[int]] = {}
        for i, b in enumerate(table.bytes[:vocab_size]):
            if b:
                self._entries.setdefault(b, []).append(i)
        self._vocabs: dict[int, Vocabulary] = {}
        self._cache: collections.OrderedDict[tuple[str, int], Index] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _vocabulary(self, eos: int) -> Vocabulary:
        if eos not in self._vocabs:
            self._vocabs[eos] = Vocabulary(eos, {k: v for k, v in self._entries.items()
                                                 if eos not in v})
        return self._vocabs[eos]

    def regex(self, pattern: str, eos: int) -> Index:
        """The index of ``pattern`` (the whole output must match it, then ``eos``)."""
        key = (pattern, eos)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            index = Index(pattern, self._vocabulary(eos))
        except Exception as e:  # noqa: BLE001 - the engine's errors name no common base class
            raise GrammarError(f"the grammar cannot be compiled: {e}") from None
        with self._lock:
            self._cache[key] = index
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return index

    def json_schema(self, schema: dict[str, Any], eos: int) -> Index:
        """The index of JSON documents valid under ``schema``."""
        return self.regex(schema_regex(schema), eos)

    def matcher(self, index: Index) -> "Matcher":
        return Matcher(index, self.words)


def schema_regex(schema: dict[str, Any]) -> str:
    """outlines-core's regex for ``schema``, or a ``GrammarError`` naming what it refused."""
    try:
        return build_regex_from_schema(json.dumps(schema))
    except Exception as e:  # noqa: BLE001
        raise GrammarError(f"unsupported JSON schema: {e}") from None


class Matcher:
    """One request's position in its grammar: ``fill`` writes the allowed tokens of the next step,
    ``advance`` consumes the sampled token."""

    def __init__(self, index: Index, words: int) -> None:
        self.guide = Guide(index)
        self.words = words

    def fill(self, row: np.ndarray) -> None:
        """Write the packed mask of allowed next tokens into ``row`` (uint32 ``[words]``)."""
        if row.dtype != np.uint32 or row.shape != (self.words,) or not row.flags.c_contiguous:
            raise ValueError(f"mask row must be contiguous uint32 [{self.words}]")
        self.guide.write_mask_into(row.ctypes.data, self.words, 4)

    def advance(self, token: int) -> None:
        if not self.guide.is_finished():
            self.guide.advance(token, return_tokens=False)

    def is_finished(self) -> bool:
        return self.guide.is_finished()
