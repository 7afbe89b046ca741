"""SFT data: both chat formats, assistant-only loss masks from the serving template, packing of
whole conversations, long-conversation policies and errors that name the file and line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cpmjax.data.sources import DataError
from cpmjax.data.tokenizer import load_tokenizer
from cpmjax.posttrain import sft
from cpmjax.serve.chat import apply_chat_template

OPENAI = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Sort: 3 1 2"},
    {"role": "assistant", "content": "1 2 3", "reasoning_content": "small first"},
    {"role": "user", "content": "Call the clock."},
    {"role": "assistant", "content": "clock()"},
    {"role": "tool", "content": "12:00"},
    {"role": "assistant", "content": "It is noon."}]}
SHAREGPT = {"system": "You are terse.", "conversations": [
    {"from": "human", "value": "Sort: 3 1 2"},
    {"from": "gpt", "value": "<think>\nsmall first\n</think>\n\n1 2 3"},
    {"from": "human", "value": "Call the clock."},
    {"from": "function_call", "value": "clock()"},
    {"from": "observation", "value": "12:00"},
    {"from": "gpt", "value": "It is noon."}]}


def _write(path: Path, records: list, raw: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + raw)
    return path


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def test_both_formats_give_the_same_tokens_and_masks(tmp_path, project_tokenizer):
    a = sft.read_conversations(_write(tmp_path / "a.jsonl", [OPENAI]))
    b = sft.read_conversations(_write(tmp_path / "b.jsonl", [SHAREGPT]))
    assert a[0].messages == b[0].messages
    (ids_a, fl_a), = sft.tokenize_conversations(a, str(project_tokenizer))
    (ids_b, fl_b), = sft.tokenize_conversations(b, str(project_tokenizer))
    assert np.array_equal(ids_a, ids_b) and np.array_equal(fl_a, fl_b)


def test_only_assistant_turns_are_targets(tmp_path, project_tokenizer):
    conv, = sft.read_conversations(_write(tmp_path / "a.jsonl", [OPENAI]))
    (ids, flags), = sft.tokenize_conversations([conv], str(project_tokenizer))
    tok = load_tokenizer(project_tokenizer)
    assert ids[0] == 1 and not flags[0]
    text = _decode(tok, ids[1:])
    assert text == apply_chat_template(conv.messages, add_generation_prompt=False)
    # the trained tokens are exactly each assistant answer and its end-of-turn token
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(flags.astype(int))) + 1)
    trained = [_decode(tok, ids[r]) for r in runs if flags[r[0]]]
    assert trained == ["<think>\nsmall first\n</think>\n\n1 2 3<|im_end|>\n",
                       "clock()<|im_end|>\n", "It is noon.<|im_end|>\n"]
    context = _decode(tok, ids[~flags])
    for part in ("You are terse.", "Sort: 3 1 2", "12:00", "<|im_start|>assistant\n"):
        assert part in context


def test_spans_follow_the_template(monkeypatch, tmp_path, project_tokenizer):
    """A changed serving template changes the rendering and the spans with it (no fork)."""
    def other(messages, add_generation_prompt=True, enable_thinking=True):
        body = "".join(f"[{m['role'].upper()}]{m['content']}[END]" for m in messages)
        return body + ("[BOT]" if add_generation_prompt else "")

    monkeypatch.setattr(sft, "apply_chat_template", lambda *a, **k: other(*a, **k))
    conv, = sft.read_conversations(_write(tmp_path / "a.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]))
    with pytest.raises(DataError, match="not render message 1 as an extension"):
        sft.render_conversation(conv)  # asked with [BOT], answered as [ASSISTANT]: no span

    def stable(messages, add_generation_prompt=True, enable_thinking=True):
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")

    monkeypatch.setattr(sft, "apply_chat_template", lambda *a, **k: stable(*a, **k))
    text, spans = sft.render_conversation(conv)
    assert text == "<user>hi</user><assistant>yo</assistant>"
    assert [text[a:b] for a, b in spans] == ["yo</assistant>"]


def test_tool_calls_the_template_drops_are_refused(tmp_path):
    record = {"messages": [{"role": "user", "content": "time?"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"type": "function", "function": {"name": "clock",
                                                                 "arguments": "{}"}}]},
                           {"role": "tool", "content": "12:00"},
                           {"role": "assistant", "content": "noon"}]}
    conv, = sft.read_conversations(_write(tmp_path / "t.jsonl", [record]))
    rendered = apply_chat_template(conv.messages, add_generation_prompt=False)
    if "clock" in rendered:  # a template that renders tool calls: the span holds the call
        text, spans = sft.render_conversation(conv)
        assert "clock" in text[spans[0][0]:spans[0][1]]
    else:
        with pytest.raises(DataError, match=r"t.jsonl:1: .*dropped .*tool calls clock"):
            sft.render_conversation(conv)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot' in 'role'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\].content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "starts with an assistant turn"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown role 'alien' in 'from'"),
    ({"conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]},
     r"conversations\[0\].value must be a string, got list"),
    ({"text": "plain"}, "needs 'messages' .* or 'conversations'"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [OPENAI, record])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        sft.read_conversations(path)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        sft.read_conversations(_write(tmp_path / "bad.jsonl", [OPENAI], raw="{oops\n"))
    with pytest.raises(DataError, match="empty.jsonl holds no conversations"):
        sft.read_conversations(_write(tmp_path / "empty.jsonl", [], raw="\n\n"))
    with pytest.raises(DataError, match="does not exist"):
        sft.read_conversations(tmp_path / "missing.jsonl")


def _items(lengths: list[int], trained_from: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for k, n in enumerate(lengths):
        flags = np.zeros(n, bool)
        flags[trained_from:] = True
        out.append((np.full(n, 10 + k, np.int32), flags))
    return out


def test_packing_keeps_conversations_whole():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 9, 9]
    tokens, seg, flags, stats = sft.pack_conversations(_items(lengths), seq_len=9, seed=1)
    assert tokens.shape == seg.shape == (stats.rows, 10)
    assert stats.rows <= 8 and stats.conversations == 11 and not stats.truncated
    seen = []
    for r in range(stats.rows):
        for s in range(1, seg[r].max() + 1):
            where = np.flatnonzero(seg[r] == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            assert len(set(tokens[r, where])) == 1  # one conversation per segment
            seen.append(len(where))
        assert (seg[r, np.flatnonzero(seg[r] == 0)] == 0).all()
        assert not flags[r][seg[r] == 0].any()
    assert sorted(seen) == sorted(lengths)
    assert stats.fill == pytest.approx(sum(lengths) / (stats.rows * 10))
    again = sft.pack_conversations(_items(lengths), seq_len=9, seed=1)
    assert np.array_equal(again[0], tokens)


def test_row_targets_stay_inside_their_conversation():
    tokens, seg, flags, _ = sft.pack_conversations(_items([4, 3, 2]), seq_len=9, seed=0)
    row = sft.chat_row_example(tokens[0], seg[0], flags[0])
    assert set(row) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for t in np.flatnonzero(row["loss_mask"]):
        assert seg[0][t] == seg[0][t + 1] > 0 and flags[0][t + 1]
    for t in range(9):  # every assistant token with its input in the same conversation counts
        if flags[0][t + 1] and seg[0][t] == seg[0][t + 1]:
            assert row["loss_mask"][t] == 1.0
    starts = np.flatnonzero(np.r_[True, row["segment_ids"][1:] != row["segment_ids"][:-1]])
    assert (row["positions"][starts] == 0).all()


def test_long_conversations_truncated_or_dropped():
    items = _items([4, 15, 3, 30], trained_from=2) + _items([20], trained_from=12)
    *_, t = sft.pack_conversations(items, seq_len=9, long="truncate")
    assert (t.truncated, t.dropped) == (2, 1)  # the last has no assistant token in its first 10
    tokens, seg, flags, d = sft.pack_conversations(items, seq_len=9, long="drop")
    assert (d.truncated, d.dropped) == (0, 3) and sorted(np.bincount(seg.ravel())[1:]) == [3, 4]
    with pytest.raises(ValueError, match="no conversation fits in rows of 3 tokens"):
        sft.pack_conversations(_items([5]), seq_len=2, long="drop")
    with pytest.raises(ValueError, match="long must be 'truncate' or 'drop'"):
        sft.pack_conversations(items, seq_len=9, long="cut")


def test_chat_dataset_logs_long_conversations(tmp_path, project_tokenizer, caplog):
    long = {"messages": [{"role": "user", "content": "word " * 200},
                         {"role": "assistant", "content": "ok"}]}
    path = _write(tmp_path / "c.jsonl", [OPENAI, long, SHAREGPT])
    with caplog.at_level(logging.WARNING):
        ds, rows, stats = sft.chat_dataset(path, str(project_tokenizer), 128, long="drop")
    assert stats.dropped == 1 and stats.conversations == 3
    assert "1 of 3 conversations are longer than 129 tokens: 0 truncated, 1 dropped" in caplog.text
    assert len(ds) == len(rows) == stats.rows
    assert ds[0]["loss_mask"].sum() > 0
    assert len(rows.target_tokens()) == sum(int(ds[i]["loss_mask"].sum()) for i in range(len(ds)))
