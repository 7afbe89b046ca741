"""Token bytes and incremental detokenization: O(1) work per token, exact across byte-level BPE
merges and multi-byte UTF-8 characters split between tokens.

``tokenizer.decode(ids)`` on the whole output after every token costs O(n) per token (O(n^2) per
request) and, decoded token by token, a character split across tokens comes out as U+FFFD. Here
each token id maps once to the bytes it stands for (``TokenTable``, read from the tokenizer's own
decoder: byte-level BPE as in GPT-2/the project tokenizer, or metaspace with byte fallback as in
Llama/MiniCPM's SentencePiece-derived tokenizers), and an incremental UTF-8 decoder
(``codecs.getincrementaldecoder``) turns the byte stream into text, holding back an incomplete
character until its last byte arrives. The same table gives the grammar engine its vocabulary.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
from typing import Any

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table (every byte gets a visible stand-in), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_types(spec: dict[str, Any] | None) -> set[str]:
    if not spec:
        return set()
    if spec.get("type") == "Sequence":
        return {t for d in spec.get("decoders", []) for t in _decoder_types(d)}
    return {spec.get("type")}


class TokenTable:
    """What each token id of a ``tokenizers.Tokenizer`` stands for, as bytes (``None``: a special
    token, dropped from text as ``decode(skip_special_tokens=True)`` drops it)."""

    def __init__(self, tokenizer: Any) -> None:
        spec = json.loads(tokenizer.to_str())
        kinds = _decoder_types(spec.get("decoder"))
        added = tokenizer.get_added_tokens_decoder()
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special = {i for i, t in added.items() if t.special}
        self.strip_first_space = "Strip" in kinds or (
            "Metaspace" in kinds and spec["decoder"].get("prepend_scheme", "always") != "never")
        byte_level = "ByteLevel" in kinds
        metaspace = bool(kinds & {"Metaspace", "Replace"})
        if not (byte_level or metaspace):
            log.warning("unknown tokenizer decoder %s: token bytes come from decoding tokens "
                        "one by one, which is lossy for characters split across tokens", kinds)
        chars = _byte_level_chars()
        self.bytes: list[bytes | None] = [None] * size
        for piece, i in tokenizer.get_vocab(with_added_tokens=True).items():
            if i in self.special:
                continue
            if byte_level:
                self.bytes[i] = bytes(chars[c] for c in piece) if all(
                    c in chars for c in piece) else piece.encode("utf-8")
            elif metaspace:
                self.bytes[i] = self._metaspace_bytes(piece)
            else:
                self.bytes[i] = tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")

    @staticmethod
    def _metaspace_bytes(piece: str) -> bytes:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:  # byte fallback: "<0xE4>" is the single byte 0xE4
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")

    def text(self, ids: list[int]) -> str:
        """All of ``ids`` as text (what ``decode(ids, skip_special_tokens=True)`` gives)."""
        d = IncrementalDetokenizer(self)
        return "".join(d.add(t) for t in ids) + d.flush()


@functools.lru_cache(maxsize=8)
def token_table(tokenizer: Any) -> TokenTable:
    """One table per tokenizer object (built in ~0.1 s for a 73k vocabulary)."""
    return TokenTable(tokenizer)


class IncrementalDetokenizer:
    """Text of a token stream, one token at a time: ``add`` returns the new text (possibly empty
    while a character is incomplete), ``flush`` the rest at the end."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = not table.strip_first_space

    def add(self, token: int) -> str:
        b = self.table.bytes[token] if 0 <= token < len(self.table.bytes) else None
        if not b:
            return ""
        return self._strip(self._utf8.decode(b))

    def flush(self) -> str:
        return self._strip(self._utf8.decode(b"", final=True))

    def _strip(self, text: str) -> str:
        if not self._started and text:
            self._started = True
            return text[1:] if text.startswith(" ") else text
        return text
