"""Default corpus and the project's tokenizer: determinism, round trip, MiniCPM special ids."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from cpmjax.data import (BOS_ID, EOS_ID, SPECIAL_TOKENS, build_default_corpus, encode,
                         get_or_build_default_tokenizer, load_tokenizer)
from cpmjax.data.corpus import HELD_OUT_EVERY, iter_documents
from cpmjax.data.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_size_split_and_determinism(corpus_dir: Path) -> None:
    train, valid = _texts(corpus_dir / "train.jsonl"), _texts(corpus_dir / "valid.jsonl")
    total = sum(map(len, train)) + sum(map(len, valid))
    assert 1_500_000 < total < 6_000_000, total
    assert len(valid) >= 20 and not set(valid) & set(train)
    # A fresh pass over the interpreter's docs reproduces the cached split in order.
    head = list(itertools.islice(iter_documents(), 10 * HELD_OUT_EVERY))
    assert head[::HELD_OUT_EVERY] == valid[:10]
    assert [d for i, d in enumerate(head) if i % HELD_OUT_EVERY] == train[:len(head) - 10]


def test_special_ids_follow_minicpm(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (BOS_ID, EOS_ID) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))
    assert tok.get_vocab_size() == 1024
    # Chat tokens are atomic, never split into bytes.
    ids = encode(tok, "<|im_start|>user\nhi<|im_end|><think>x</think>", add_bos=False)
    assert ids[0] == 3 and 4 in ids and 5 in ids and 6 in ids


def test_round_trip_on_held_out_text(tokenizer_dir: Path, corpus_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    for text in _texts(corpus_dir / "valid.jsonl")[:30] + ["Ünïcödé ✓ and emoji 🙂, tabs\t!"]:
        ids = encode(tok, text, add_bos=True, add_eos=True)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        assert tok.decode(ids[1:-1]) == text
    # BPE compresses English: well under one token per 2 characters.
    text = _texts(corpus_dir / "valid.jsonl")[0]
    assert len(encode(tok, text, add_bos=False)) < len(text) / 2


def test_autotokenizer_loads_folder_offline(tokenizer_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.convert_tokens_to_ids(SPECIAL_TOKENS[3:]) == [3, 4, 5, 6]
    text = "The quick brown fox jumps over the lazy dog."
    assert hf(text)["input_ids"] == encode(load_tokenizer(tokenizer_dir), text, add_bos=False)
    assert hf.decode(hf(text)["input_ids"]) == text


def test_training_is_deterministic(corpus_dir: Path) -> None:
    texts = _texts(corpus_dir / "valid.jsonl")
    a, b = train_tokenizer(texts, 600), train_tokenizer(texts, 600)
    assert a.get_vocab() == b.get_vocab()
    assert a.to_str() == b.to_str()


def test_build_tokenizer_cli(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"line {i} of some words here"}) + "\n"
                           for i in range(50)))
    out = tmp_path / "tok"
    run = subprocess.run([sys.executable, str(REPO / "launch/build_tokenizer.py"), f"--out={out}",
                          f"--source={src}", "--vocab_size=300"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert load_tokenizer(out).token_to_id("</think>") == 6
    bad = subprocess.run([sys.executable, str(REPO / "launch/build_tokenizer.py"), f"--out={out}",
                          f"--source={tmp_path / 'missing.jsonl'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and "missing.jsonl" in bad.stderr


def test_corpus_and_tokenizer_are_cached(data_cache: Path, corpus_dir: Path,
                                         tokenizer_dir: Path) -> None:
    files = [corpus_dir / "train.jsonl", corpus_dir / "valid.jsonl", tokenizer_dir / "tokenizer.json"]
    before = [f.stat().st_mtime_ns for f in files]
    assert build_default_corpus(data_cache) == corpus_dir
    assert get_or_build_default_tokenizer(data_cache, vocab_size=1024) == tokenizer_dir
    assert [f.stat().st_mtime_ns for f in files] == before  # reused, not rebuilt
