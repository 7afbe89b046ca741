"""One OpenAI choice as its tokens arrive: incremental text, stop strings, log-probabilities.

Runs in the server's event loop, not the engine thread (``Scheduler`` only hands over token ids and
their log-probabilities): text comes from ``IncrementalDetokenizer`` (O(1) per token), a stop string
cuts the text where it starts (the request is then cancelled, freeing its slot), and while
streaming, text that could still become a stop string is held back until it cannot. Log-
probabilities are formatted as OpenAI's completions (``tokens``/``token_logprobs``/
``top_logprobs``/``text_offset``) or chat (``content: [{token, logprob, bytes, top_logprobs}]``)
objects; ``-inf`` is reported as -9999.0, as vLLM does (JSON has no infinity).
"""

from __future__ import annotations

import math
from typing import Any

from cpmjax.serve.detokenize import IncrementalDetokenizer, TokenTable

MIN_LOGPROB = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


class TokenText:
    """Display text and bytes of token ids (special tokens by name)."""

    def __init__(self, table: TokenTable | None, tokenizer: Any) -> None:
        self.table, self.tokenizer = table, tokenizer

    def bytes(self, token: int) -> bytes:
        if self.table is None:  # no tokenizer: ids are all there is
            return b""
        b = self.table.bytes[token] if token < len(self.table.bytes) else None
        if b is None:
            return (self.tokenizer.id_to_token(token) or "").encode("utf-8")
        return b

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")


class Choice:
    """Text, finish reason and log-probabilities of one choice."""

    def __init__(self, index: int, table: TokenTable | None, stops: list[str]) -> None:
        self.index = index
        self.detok = None if table is None else IncrementalDetokenizer(table)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of ``text`` already streamed
        self.tokens: list[int] = []
        self.logprobs: list[tuple[float, list[int], list[float]]] = []
        self.finish_reason: str | None = None
        self.stopped = False  # a stop string was found: the request should be cancelled

    def add(self, token: int, logprobs: Any = None) -> None:
        """Take one generated token (ignored once a stop string ended the choice)."""
        if self.stopped:
            return
        self.tokens.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if self.detok is not None:
            start = max(len(self.text) - self.hold, 0)
            self.text += self.detok.add(token)
            self._check_stop(start)

    def finish(self, reason: str | None) -> None:
        """The request ended with ``reason`` (a stop token adds no text: it is special)."""
        if not self.stopped and self.detok is not None:
            start = max(len(self.text) - self.hold, 0)
            self.text += self.detok.flush()
            self._check_stop(start)
        self.finish_reason = "stop" if self.stopped else reason

    def _check_stop(self, start: int) -> None:
        for s in self.stops:
            cut = self.text.find(s, start)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
                start = min(start, cut)

    def delta(self, final: bool) -> str:
        """Text not streamed yet that can no longer turn into a stop string."""
        end = len(self.text) if final or self.stopped else max(len(self.text) - self.hold,
                                                              self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    # ---- log-probabilities ---------------------------------------------------------------
    def chat_logprobs(self, names: TokenText, start: int = 0) -> list[dict[str, Any]]:
        out = []
        for tok, (lp, ids, top) in zip(self.tokens[start:], self.logprobs[start:]):
            out.append({"token": names.text(tok), "logprob": _finite(lp),
                        "bytes": list(names.bytes(tok)),
                        "top_logprobs": [{"token": names.text(i), "logprob": _finite(v),
                                          "bytes": list(names.bytes(i))}
                                         for i, v in zip(ids, top)]})
        return out


def completion_logprobs(names: TokenText, tokens: list[int], entries: list[Any],
                        offset: int = 0) -> dict[str, list[Any]]:
    """OpenAI's legacy completions logprobs for ``tokens`` with (logprob, top ids, top) entries
    (``None`` entries: no log-probability, the prompt's first token)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    pos = offset
    for tok, entry in zip(tokens, entries):
        text = names.text(tok)
        out["tokens"].append(text)
        out["text_offset"].append(pos)
        pos += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp, ids, top = entry
        out["token_logprobs"].append(_finite(lp))
        alts: dict[str, float] = {}
        for i, v in zip(ids, top):
            alts.setdefault(names.text(i), _finite(v))
        out["top_logprobs"].append(alts)
    return out


def prompt_entries(values: Any, n: int, k: int) -> list[Any]:
    """Per prompt token (None for the first), (logprob, top ids, top) of the first ``k``."""
    if values is None:
        return [None] * n
    lp, ids, top = values
    return [None] + [(float(lp[i]), [int(x) for x in ids[i, :k]], [float(x) for x in top[i, :k]])
                     for i in range(n - 1)]
