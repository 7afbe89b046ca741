"""Evaluation of chat models on the instruction set: held-out assistant-token loss, and the
accuracy of greedy answers generated through the serving engine with the chat template, the way
a served model is asked (``<s>`` + the rendered prompt with the generation prompt, stopping at
``<|im_end|>``), judged by :func:`cpmjax.posttrain.tasks.check`.

Works for any params the serving engine runs: full precision, int4/int8 packed
(``cpmjax.quant``) or ternary packed (``cpmjax.quant.ternary``) weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.data.tokenizer import encode, get_or_build_default_tokenizer, load_tokenizer
from cpmjax.model import forward
from cpmjax.model.params import Params
from cpmjax.posttrain import sft, tasks
from cpmjax.quant.qforward import layer_transform_for
from cpmjax.serve.chat import apply_chat_template
from cpmjax.train.step import nll_sum

IM_END = "<|im_end|>"


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """``<s>`` + the rendered conversation with the assistant's generation prompt, as the server
    tokenizes a chat request."""
    return encode(tokenizer, apply_chat_template(list(messages), add_generation_prompt=True),
                  add_bos=True)


def generate_answers(cfg: ModelConfig, params: Params, tokenizer_path: str | os.PathLike,
                     examples: Sequence[tasks.Example], max_new_tokens: int = 24,
                     max_slots: int = 64) -> list[str]:
    """The greedy output text per example (special tokens kept, so thinking stays visible)."""
    from cpmjax.serve.generate import generate  # the serving stack; import on use

    tok = load_tokenizer(tokenizer_path)
    stop = tok.token_to_id(IM_END)
    prompts = [chat_prompt_ids(tok, tasks.prompt_messages(ex)) for ex in examples]
    outs = generate(cfg, params, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                    stop_token_ids=None if stop is None else [stop], max_slots=max_slots)
    return [tok.decode(o, skip_special_tokens=False) for o in outs]


def assistant_loss(cfg: ModelConfig, params: Params, rows: sft.ChatRows,
                   batch_size: int = 16) -> float:
    """Mean NLL of every assistant target token of ``rows`` (all rows, the last batch padded
    with rows that have no targets), for any params the serving engine runs (packed ones are
    unpacked one layer at a time inside the layer scan, as the engine does)."""
    def sums(p: Params, b: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        out = forward(p, cfg, b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"],
                      layer_transform=layer_transform_for(p, cfg))
        return nll_sum(out.logits, b["targets"], b["loss_mask"]), jnp.sum(b["loss_mask"])

    step = jax.jit(sums)
    total, count = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch += [{k: np.zeros_like(v) for k, v in batch[0].items()}] * (batch_size - len(batch))
        s, c = step(params, {k: jnp.asarray(np.stack([b[k] for b in batch])) for k in batch[0]})
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


@dataclasses.dataclass
class HeldOut:
    """The held-out examples to answer, their packed rows (for the loss) and the tokenizer."""

    examples: list[tasks.Example]
    rows: sft.ChatRows
    tokenizer: str
    path: str


def load_heldout(cache_dir: str | os.PathLike, vocab_size: int, seq_len: int,
                 path: str | os.PathLike | None = None, n: int = 0,
                 families: Sequence[str] | None = None) -> HeldOut:
    """The instruction set's held-out split (of ``families``; built in ``cache_dir`` on first
    use) or the examples at ``path``; the first ``n`` are answered (0 = all), all of them give
    the loss."""
    path = str(path or tasks.build_instruct_set(cache_dir, families=families) / "heldout.jsonl")
    examples = tasks.read_jsonl(path)
    tok = str(get_or_build_default_tokenizer(cache_dir, vocab_size))
    _, rows, _ = sft.chat_dataset(path, tok, seq_len)
    return HeldOut(examples[:n] if n else examples, rows, tok, path)


def evaluate_chat_model(cfg: ModelConfig, params: Params, tokenizer_path: str | os.PathLike,
                        heldout: Sequence[tasks.Example], rows: sft.ChatRows) -> dict[str, Any]:
    """Held-out assistant loss/perplexity and instruction-set accuracy (overall, per family,
    share of well-formed answers) of one model."""
    loss = assistant_loss(cfg, params, rows)
    outputs = generate_answers(cfg, params, tokenizer_path, heldout)
    report = {"assistant_loss": loss, "assistant_ppl": math.exp(loss),
              **tasks.accuracy(heldout, outputs)}
    report["samples"] = [{"prompt": ex["messages"][0]["content"], "answer": ex["answer"],
                          "output": out} for ex, out in list(zip(heldout, outputs))[:7]]
    return report
