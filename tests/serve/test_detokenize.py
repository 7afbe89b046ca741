"""Incremental detokenization equals ``decode`` of the whole sequence, for the project's byte-level
BPE and for a MiniCPM-style (metaspace + byte fallback, LlamaTokenizer layout) tokenizer built here;
and the grammar engine walks both tokenizers to schema-valid JSON."""

import json
import random

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cpmjax.data.tokenizer import train_tokenizer
from cpmjax.serve.detokenize import IncrementalDetokenizer, TokenTable
from cpmjax.serve.grammar import Grammars

TEXT = ["The quick brown fox, café naïve 你好世界 😀🎉 日本語。", '{"a": [1, 2.5], "b": "x"}'] * 40


def minicpm_style():
    """MiniCPM ships a LlamaTokenizer (SentencePiece BPE with byte fallback): metaspace pieces,
    <0xXX> byte tokens, the decoder that strips the first space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=500, special_tokens=special,
                                                       show_progress=False))
    # the byte pieces <0x00>..<0xFF> are ordinary vocabulary entries, as in MiniCPM's tokenizer
    model = json.loads(tok.to_str())["model"]
    pieces = special + [f"<0x{i:02X}>" for i in range(256)] + [
        p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if p not in special]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    out = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>",
                               byte_fallback=True))
    out.pre_tokenizer, out.decoder = tok.pre_tokenizer, tok.decoder
    out.add_special_tokens(special)
    return out


@pytest.fixture(scope="module", params=["byte_level", "minicpm_style"])
def tok(request):
    return train_tokenizer(TEXT, 400) if request.param == "byte_level" else minicpm_style()


def test_incremental_text_equals_decode(tok):
    table = TokenTable(tok)
    rng = random.Random(0)
    samples = [tok.encode(t).ids for t in TEXT[:2]]
    samples += [[rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 16))]
                for _ in range(300)]  # random ids: split characters, invalid bytes, specials
    for ids in samples:
        raw = b"".join(table.bytes[t] or b"" for t in ids)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            # invalid UTF-8: byte-level decode replaces each bad subsequence with U+FFFD, as
            # here, but the ByteFallback decoder replaces every byte token of a run that fails
            # (valid bytes included); compare only where both are defined
            if "ByteFallback" in tok.to_str():
                continue
        d = IncrementalDetokenizer(table)
        pieces = [d.add(t) for t in ids] + [d.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_a_character_split_across_tokens_appears_once_complete(tok):
    table = TokenTable(tok)
    ids = tok.encode("😀").ids
    d = IncrementalDetokenizer(table)
    out = [d.add(t) for t in ids]
    assert "".join(out) + d.flush() == "😀" and "\ufffd" not in "".join(out)


def test_grammar_walks_to_valid_json(tok):
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"},
                                                     "maxItems": 3},
                                               "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"]}
    eos = tok.token_to_id("</s>")
    g = Grammars(TokenTable(tok), tok.get_vocab_size())
    m = g.matcher(g.json_schema(schema, eos))
    rng = np.random.default_rng(0)
    row, out = np.zeros(g.words, np.uint32), []
    for _ in range(200):
        m.fill(row)
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
        t = int(rng.choice(allowed))
        if t == eos:
            break
        out.append(t)
        m.advance(t)
    jsonschema.validate(json.loads(tok.decode(out)), schema)
