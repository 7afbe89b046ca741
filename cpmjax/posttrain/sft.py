"""Supervised fine-tuning data: chat JSONL -> MiniCPM4 chat format -> packed rows that train only
on the assistant's tokens (MiniCPM4 report, arXiv 2506.07900 §3.1, fine-tunes on conversations).

Sources are JSONL files, one conversation per line, in either format (detected per line):

- OpenAI messages: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str},
  ...], "tools": [...]?}``. An assistant turn may carry ``reasoning_content`` (its thinking,
  as vLLM and DeepSeek return it), which becomes a leading ``<think>\\n...\\n</think>\\n\\n`` block
  of its content, the form MiniCPM4.1's template gives a thinking turn; ``tool_calls`` and the
  ``tools`` list are passed to the chat template as they are (and refused if the template drops
  them). ``content`` may be null only in an assistant turn with ``tool_calls``.
- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system"|"tool"|"observation"|
  "function_call", "value": str}, ...], "system": str?}``; ``function_call`` turns are the
  assistant's, ``observation`` / ``tool`` turns the tool's.

Rendering uses the serving template, :func:`cpmjax.serve.chat.apply_chat_template`, never a copy:
each assistant turn's span is the text that rendering ``messages[:i+1]`` adds to the rendering of
``messages[:i]`` with the generation prompt, i.e. exactly what the model is asked to produce when
served (its content and the end-of-turn token). Tokens whose text starts inside a span are loss
targets; everything else (system, user and tool turns, role headers) is context only. The rows'
``loss_mask`` carries this, so the train step needs no change.

Each conversation is ``<s>`` + the rendered text. Conversations are packed whole into rows of
``seq_len + 1`` tokens (best fit, in a seeded order), each with its own segment id and positions
from 0; the rest of a row is padding (segment 0, never a target). A conversation longer than a
row is truncated to it or dropped (``long="truncate" | "drop"``), and the count is reported.
Bad data fails with the file and line: invalid JSON, unknown formats or roles, non-string
content, a conversation without an assistant turn, an empty file.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import grain
import numpy as np

from cpmjax.data.pipeline import Batch, segment_positions, unigram_token_loss
from cpmjax.data.sources import DataError
from cpmjax.data.tokenizer import BOS_ID, load_tokenizer
from cpmjax.serve.chat import ROLES, apply_chat_template

log = logging.getLogger(__name__)

LongPolicy = Literal["truncate", "drop"]
Message = dict[str, Any]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool",
                  "function_call": "assistant"}
_PASS_THROUGH = ("tool_calls", "tool_call_id", "name")


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One validated conversation and where it came from (``file:line``)."""

    messages: list[Message]
    where: str
    tools: list[Any] | None = None


def _turn(where: str, kind: str, i: int, turn: Any, role_key: str, value_key: str,
          roles: Sequence[str]) -> tuple[str, Any]:
    """(role, value) of one turn, refusing a non-object turn or an unknown role."""
    if not isinstance(turn, dict):
        raise DataError(f"{where}: {kind}[{i}] is not an object")
    role = turn.get(role_key)
    if role not in roles:
        raise DataError(f"{where}: {kind}[{i}] has unknown role {role!r} in {role_key!r} "
                        f"(expected one of {', '.join(roles)})")
    return role, turn.get(value_key)


def _string(where: str, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {field} must be a string, got {type(value).__name__}")
    return value


def _openai_messages(raw: Any, where: str) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        role, content = _turn(where, "messages", i, m, "role", "content", ROLES)
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""
        content = _string(where, f"messages[{i}].content", content)
        thinking = m.get("reasoning_content")
        if thinking is not None:
            if role != "assistant" or not isinstance(thinking, str):
                raise DataError(f"{where}: messages[{i}].reasoning_content must be a string of "
                                "an assistant turn")
            content = f"<think>\n{thinking.strip()}\n</think>\n\n{content.lstrip()}"
        msg = {"role": role, "content": content}
        msg.update({k: m[k] for k in _PASS_THROUGH if m.get(k) is not None})
        out.append(msg)
    return out


def _sharegpt_messages(record: Mapping[str, Any], where: str) -> list[Message]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    out = []
    if record.get("system") is not None:
        out.append({"role": "system", "content": _string(where, "'system'", record["system"])})
    for i, t in enumerate(turns):
        who, value = _turn(where, "conversations", i, t, "from", "value", list(SHAREGPT_ROLES))
        out.append({"role": SHAREGPT_ROLES[who],
                    "content": _string(where, f"conversations[{i}].value", value)})
    return out


def parse_conversation(record: Any, where: str) -> Conversation:
    """A validated :class:`Conversation` from one JSONL record (either format)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        messages = _openai_messages(record["messages"], where)
    elif "conversations" in record:
        messages = _sharegpt_messages(record, where)
    else:
        raise DataError(f"{where}: a record needs 'messages' (OpenAI format) or "
                        "'conversations' (ShareGPT format)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant turn; the model "
                        "is only ever asked to answer after a system or user turn")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list")
    return Conversation(messages, where, tools)


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Every conversation of a chat JSONL file, in file order (blank lines are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"chat data file {p} does not exist")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from e
            out.append(parse_conversation(record, where))
    if not out:
        raise DataError(f"{p} holds no conversations (the file is empty)")
    return out


def _render(conv: Conversation, messages: Sequence[Message], generation_prompt: bool) -> str:
    kwargs = {}
    if conv.tools is not None:
        if "tools" not in inspect.signature(apply_chat_template).parameters:
            raise DataError(f"{conv.where}: the record has 'tools' but the chat template takes "
                            "no tool list")
        kwargs["tools"] = conv.tools
    try:
        return apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                   **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{conv.where}: the chat template refused the conversation ({e})") from e


def render_conversation(conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, ``[start, end)`` character spans of its assistant turns)."""
    msgs = conv.messages
    text = _render(conv, msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        asked = _render(conv, msgs[:i], True)
        answered = _render(conv, msgs[:i + 1], False)
        if not (answered.startswith(asked) and text.startswith(answered)):
            raise DataError(f"{conv.where}: the chat template does not render message {i} as "
                            "an extension of the messages before it, so its span is undefined")
        span = answered[len(asked):]
        missing = [c["function"]["name"] for c in m.get("tool_calls", [])
                   if isinstance(c, dict) and isinstance(c.get("function"), dict)
                   and c["function"].get("name", "") not in span]
        if m["content"] not in span or missing:
            raise DataError(f"{conv.where}: the chat template dropped part of assistant message "
                            f"{i} ({'tool calls ' + ', '.join(missing) if missing else 'content'})")
        spans.append((len(asked), len(answered)))
    return text, spans


def tokenize_conversations(convs: Sequence[Conversation], tokenizer_path: str
                           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, is-assistant-token flags) per conversation: ``<s>`` + the rendered text; a
    token is the assistant's if its text starts inside an assistant span."""
    tok = load_tokenizer(tokenizer_path)
    rendered = [render_conversation(c) for c in convs]
    encodings = tok.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for (_, spans), enc in zip(rendered, encodings):
        starts = np.asarray([a for a, _ in enc.offsets], np.int64)
        trained = np.zeros(len(starts), bool)
        for a, b in spans:
            trained |= (starts >= a) & (starts < b)
        out.append((np.asarray([BOS_ID, *enc.ids], np.int32), np.r_[False, trained]))
    return out


@dataclasses.dataclass
class PackStats:
    conversations: int
    rows: int
    truncated: int
    dropped: int
    assistant_tokens: int
    fill: float  # share of row positions holding tokens (not padding)


def pack_conversations(items: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
                       long: LongPolicy = "truncate", seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, PackStats]:
    """(tokens, segment ids, assistant flags), each ``[rows, seq_len + 1]``, and statistics.

    Conversations are taken in a seeded random order and each goes whole into the row with the
    least room that fits it (best fit), so no conversation is split between rows."""
    if long not in ("truncate", "drop"):
        raise ValueError(f"long must be 'truncate' or 'drop', got {long!r}")
    width = seq_len + 1
    kept, truncated, dropped = [], 0, 0
    for ids, trained in items:
        if len(ids) > width:
            if long == "drop" or not trained[:width].any():
                dropped += 1
                continue
            ids, trained = ids[:width], trained[:width]
            truncated += 1
        kept.append((ids, trained))
    if not kept:
        raise ValueError(f"no conversation fits in rows of {width} tokens "
                         f"({dropped} dropped)")
    order = np.random.default_rng(seed).permutation(len(kept))
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(width + 1)]  # row indices by free positions
    room: list[int] = []
    for k in order:
        n = len(kept[k][0])
        fit = next((r for r in range(n, width + 1) if by_room[r]), None)
        if fit is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        else:
            row = by_room[fit].pop()
        rows[row].append(int(k))
        room[row] -= n
        by_room[room[row]].append(row)
    tokens = np.zeros((len(rows), width), np.int32)
    seg = np.zeros((len(rows), width), np.int32)
    flags = np.zeros((len(rows), width), bool)
    for r, members in enumerate(rows):
        at = 0
        for s, k in enumerate(members, 1):
            ids, trained = kept[k]
            tokens[r, at:at + len(ids)], seg[r, at:at + len(ids)] = ids, s
            flags[r, at:at + len(ids)] = trained
            at += len(ids)
    stats = PackStats(len(items), len(rows), truncated, dropped, int(flags.sum()),
                      float((seg > 0).mean()))
    return tokens, seg, flags, stats


def chat_row_example(tokens: np.ndarray, seg: np.ndarray, flags: np.ndarray) -> Batch:
    """Model inputs of one packed chat row: targets are the assistant tokens of the same
    conversation as their input."""
    seg_in = seg[:-1]
    mask = flags[1:] & (seg[1:] == seg_in) & (seg_in > 0)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg_in,
            "positions": segment_positions(seg_in), "loss_mask": mask.astype(np.float32)}


class ChatRows:
    """A random-access grain source over packed chat rows."""

    def __init__(self, tokens: np.ndarray, seg: np.ndarray, flags: np.ndarray) -> None:
        self.tokens, self.seg, self.flags = tokens, seg, flags

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> Batch:
        return chat_row_example(self.tokens[i], self.seg[i], self.flags[i])

    def target_tokens(self) -> np.ndarray:
        """Every assistant target token (for the unigram baseline)."""
        return self.tokens[:, 1:][np.stack([self[i]["loss_mask"] for i in range(len(self))]) > 0]


def chat_dataset(path: str | os.PathLike, tokenizer_path: str, seq_len: int,
                 long: LongPolicy = "truncate", seed: int = 0
                 ) -> tuple[grain.MapDataset, ChatRows, PackStats]:
    """Unshuffled packed rows of one chat file, its row source and its packing statistics
    (long conversations are logged)."""
    convs = read_conversations(path)
    tokens, seg, flags, stats = pack_conversations(tokenize_conversations(convs, tokenizer_path),
                                                   seq_len, long, seed)
    if stats.truncated or stats.dropped:
        log.warning("%s: %d of %d conversations are longer than %d tokens: %d truncated, %d "
                    "dropped", path, stats.truncated + stats.dropped, stats.conversations,
                    seq_len + 1, stats.truncated, stats.dropped)
    rows = ChatRows(tokens, seg, flags)
    return grain.MapDataset.source(rows), rows, stats


def assistant_unigram_loss(train: ChatRows, held: ChatRows, vocab_size: int) -> float:
    """Held-out assistant-token loss of an add-one unigram model of the train assistant tokens."""
    return unigram_token_loss(train.target_tokens(), held.target_tokens(), vocab_size)
