"""grain pipeline: packing keeps documents apart, batches are f(seed, step), resume is exact,
host shards partition the global batch, mixtures follow their weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpmjax.data import (BOS_ID, EOS_ID, Source, eval_batches, make_batch_dataset,
                         make_batch_iterator, pack_rows, read_documents, row_example,
                         tokenize_documents, unigram_loss)
from cpmjax.data.pipeline import packed_dataset

L, B = 64, 8


@pytest.fixture(scope="module")
def valid_source(corpus_dir: Path) -> Source:
    return Source(str(corpus_dir / "valid.jsonl"))


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("digits") / "digits.jsonl"
    p.write_text("".join(json.dumps({"text": " ".join(map(str, rng.integers(0, 999, n)))}) + "\n"
                         for n in rng.integers(3, 30, 300)))
    return Source(str(p))


def _check_row(row: dict[str, np.ndarray]) -> None:
    """Every packing invariant of one row."""
    inp, tgt, seg, pos, mask = (row[k] for k in
                                ("inputs", "targets", "segment_ids", "positions", "loss_mask"))
    assert inp.shape == tgt.shape == seg.shape == pos.shape == mask.shape == (L,)
    np.testing.assert_array_equal(inp[1:], tgt[:-1])
    assert seg[0] == 1 and set(np.diff(seg)) <= {0, 1}  # no padding: segments 1..n, in order
    starts = np.flatnonzero(np.r_[1, np.diff(seg)])
    assert (pos[starts] == 0).all()
    np.testing.assert_array_equal(pos, np.arange(L) - starts[seg - 1])
    assert (inp[starts[1:]] == BOS_ID).all()  # a new segment inside a row is a new document
    # Inside a row a new document starts exactly where bos is an input.
    np.testing.assert_array_equal(np.flatnonzero(inp == BOS_ID), starts[inp[starts] == BOS_ID])
    # No target crosses a boundary: targets are masked exactly at a document's last input (its
    # eos), inside the row or at the row's end when the next row starts a new document ...
    ends = np.r_[starts[1:] - 1, [L - 1] if tgt[-1] == BOS_ID else []].astype(int)
    np.testing.assert_array_equal(np.flatnonzero(mask == 0), ends)
    assert (inp[ends] == EOS_ID).all() and (tgt[ends] == BOS_ID).all()
    # ... so the last counted target of every finished document is its eos.
    assert (tgt[ends[ends > 0] - 1] == EOS_ID).all()


def test_rows_keep_documents_apart(valid_source: Source, digits_source: Source,
                                   tokenizer_dir: Path) -> None:
    boundaries = 0
    for source in (valid_source, digits_source):  # long prose documents, short number lists
        batches = make_batch_dataset([source], str(tokenizer_dir), L, B, seed=0)
        for s in range(6):
            batch = batches[s]
            assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (B, L)
            for i in range(B):
                _check_row({k: v[i] for k, v in batch.items()})
            boundaries += int((batch["segment_ids"] > 1).any(axis=1).sum())
    assert boundaries > 30  # the invariants were checked across many document boundaries


def test_long_document_is_split_not_dropped() -> None:
    docs = [np.arange(10, 15, dtype=np.int32), np.arange(100, 100 + 3 * (L + 1) + 7, dtype=np.int32),
            np.arange(20, 30, dtype=np.int32)]
    tokens, doc_ids = pack_rows(docs, L)
    stream = np.concatenate(docs)
    assert tokens.shape == (len(stream) // (L + 1), L + 1)
    np.testing.assert_array_equal(tokens.ravel(), stream[:tokens.size])  # every token, in order
    second = row_example(tokens[1], doc_ids[1])  # all inside the long document
    np.testing.assert_array_equal(second["positions"], np.arange(L))
    assert (second["segment_ids"] == 1).all() and (second["loss_mask"] == 1).all()


def test_batch_is_function_of_seed_and_step(valid_source: Source, tokenizer_dir: Path) -> None:
    tok = str(tokenizer_dir)
    a = make_batch_dataset([valid_source], tok, L, B, seed=3)
    b = make_batch_dataset([valid_source], tok, L, B, seed=3)
    it = make_batch_iterator([valid_source], tok, L, B, seed=3)
    for s in [0, 1, 2]:
        np.testing.assert_array_equal(next(it)["inputs"], a[s]["inputs"])
    for s in [7, 2, 40]:  # random access in any order
        np.testing.assert_array_equal(a[s]["inputs"], b[s]["inputs"])
    other = make_batch_dataset([valid_source], tok, L, B, seed=4)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])


def test_each_epoch_reshuffles(valid_source: Source, tokenizer_dir: Path) -> None:
    n = len(packed_dataset(valid_source, str(tokenizer_dir), L))
    rows = make_batch_dataset([valid_source], str(tokenizer_dir), L, 1, seed=0)
    ep0 = [rows[i]["inputs"][0].tobytes() for i in range(n)]
    ep1 = [rows[n + i]["inputs"][0].tobytes() for i in range(n)]
    assert sorted(ep0) == sorted(ep1) and len(set(ep0)) == n  # each epoch: every row once
    assert ep0 != ep1


def test_resume_is_exact(valid_source: Source, tokenizer_dir: Path) -> None:
    args = ([valid_source], str(tokenizer_dir), L, B)
    it = make_batch_iterator(*args, seed=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # storable next to the train state
    expected = [next(it) for _ in range(4)]
    resumed = make_batch_iterator(*args, seed=1)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_host_shards_partition_global_batch(valid_source: Source, tokenizer_dir: Path) -> None:
    args = ([valid_source], str(tokenizer_dir), L, B)
    whole = make_batch_dataset(*args, seed=2)
    shards = [make_batch_dataset(*args, seed=2, shard_index=i, shard_count=4) for i in range(4)]
    for s in [0, 5]:
        parts = [sh[s] for sh in shards]
        assert all(p["inputs"].shape == (B // 4, L) for p in parts)
        for k in whole[s]:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[s][k])
        keys = [{r.tobytes() for r in p["inputs"]} for p in parts]
        assert all(not keys[i] & keys[j] for i in range(4) for j in range(i + 1, 4))
    with pytest.raises(ValueError, match="not divisible"):
        make_batch_dataset(*args, seed=2, shard_index=0, shard_count=3)


def test_mixture_follows_weights(valid_source: Source, digits_source: Source,
                                 tokenizer_dir: Path) -> None:
    tok = str(tokenizer_dir)
    digit_rows = {r["inputs"].tobytes() for r in packed_dataset(digits_source, tok, L)}
    mixed = make_batch_dataset([Source(valid_source.path, weight=3.0),
                                Source(digits_source.path, weight=1.0)], tok, L, B, seed=0)
    rows = [r.tobytes() for s in range(50) for r in mixed[s]["inputs"]]
    share = sum(r in digit_rows for r in rows) / len(rows)
    assert abs(share - 0.25) < 0.05, share


def test_eval_batches_fixed(valid_source: Source, tokenizer_dir: Path) -> None:
    a = eval_batches(valid_source, str(tokenizer_dir), L, B, max_batches=3)
    b = eval_batches(valid_source, str(tokenizer_dir), L, B, max_batches=3)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert x["inputs"].shape == (B, L)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # Unshuffled: the first row starts the first held-out document.
    assert a[0]["inputs"][0, 0] == BOS_ID and a[0]["positions"][0, 0] == 0


def test_unigram_loss_by_hand_and_on_corpus(corpus_dir: Path, tokenizer_dir: Path) -> None:
    train = [np.array([1, 5, 5, 6])]
    held = [np.array([1, 5, 6])]
    # add-one counts over vocab 8: id5 -> 3, id6 -> 2, total 12; bos is never a target.
    want = -(np.log(3 / 12) + np.log(2 / 12)) / 2
    assert unigram_loss(train, held, 8) == pytest.approx(want)
    tok = str(tokenizer_dir)
    docs = lambda f: tokenize_documents(read_documents(corpus_dir / f, "jsonl"), tok)  # noqa: E731
    loss = unigram_loss(docs("train.jsonl"), docs("valid.jsonl"), 1024)
    assert 3.0 < loss < np.log(1024), loss  # far from uniform, far from zero


def test_empty_or_too_small_source_is_named(tmp_path: Path, tokenizer_dir: Path) -> None:
    from cpmjax.data import DataError

    empty, small = tmp_path / "empty.jsonl", tmp_path / "small.jsonl"
    empty.write_text("\n")
    small.write_text(json.dumps({"text": "a few words"}) + "\n")
    with pytest.raises(DataError, match=f"data source {empty} holds no documents"):
        make_batch_iterator([Source(str(empty))], str(tokenizer_dir), L, B, 0)
    with pytest.raises(DataError, match=rf"data source {small}: \d+ tokens are fewer than one "
                                        rf"row of {L + 1} \(train.seq_len \+ 1\)"):
        make_batch_iterator([Source(str(small))], str(tokenizer_dir), L, B, 0)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "word " * 200}) + "\n")
    with pytest.raises(DataError, match=f"held-out set {rows} has \\d+ packed rows of {L + 1} "
                                        f"tokens, fewer than one batch of {B}"):
        eval_batches(Source(str(rows)), str(tokenizer_dir), L, B, 1)
