"""What RL trains on: prompts as token ids, and a reward for a generated response.

The trainer sees only this interface (:class:`PromptSet`), so any verifiable task plugs in:
``rl.prompts`` names one by import path, ``module:factory`` (default the project's instruction
set, :func:`instruct_prompts`); the factory gets the experiment config.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, Sequence

from cpmjax.config import ConfigError
from cpmjax.data.tokenizer import encode, get_or_build_default_tokenizer, load_tokenizer
from cpmjax.posttrain import tasks
from cpmjax.rl.rewards import verifiable_reward
from cpmjax.serve.chat import apply_chat_template

SPLITS = ("train", "heldout")


class PromptSet(Protocol):
    """Prompts of a train and a held-out split, and a reward for a response to one of them."""

    def prompts(self, split: str) -> Sequence[list[int]]:
        """Token ids of every prompt of ``split`` (what the model continues)."""

    def reward(self, split: str, index: int, response: list[int]) -> float:
        """Reward of ``response`` (generated token ids, a final stop token included) to prompt
        ``index`` of ``split``."""


class InstructPrompts:
    """The project's instruction set in the chat format the SFT model learned: ``<s>`` + the
    chat template's rendering of the user turn with the assistant prefix; the response is
    decoded (special tokens kept, so the judge sees ``<|im_end|>``) and judged."""

    def __init__(self, tokenizer: str, n_train: int, n_heldout: int, seed: int = 0,
                 families: Sequence[str] | None = None, format_credit: float = 0.0) -> None:
        self._tok = load_tokenizer(tokenizer)
        self.examples = {"train": tasks.generate("train", n_train, seed, families),
                         "heldout": tasks.generate("heldout", n_heldout, seed, families)}
        self._prompts = {s: [self.encode_prompt(ex) for ex in exs]
                         for s, exs in self.examples.items()}
        self.format_credit = format_credit

    def encode_prompt(self, example: tasks.Example) -> list[int]:
        text = apply_chat_template(tasks.prompt_messages(example), add_generation_prompt=True)
        return encode(self._tok, text, add_bos=True)

    def prompts(self, split: str) -> Sequence[list[int]]:
        return self._prompts[split]

    def decode(self, response: list[int]) -> str:
        return self._tok.decode(response, skip_special_tokens=False)

    def reward(self, split: str, index: int, response: list[int]) -> float:
        return verifiable_reward(self.examples[split][index], self.decode(response),
                                 self.format_credit)


def run_tokenizer(cfg: Any) -> str:
    """The run's tokenizer folder: ``data.tokenizer`` or the project tokenizer of this vocabulary
    (built in ``data.cache_dir`` on first use)."""
    return cfg.data.tokenizer or str(get_or_build_default_tokenizer(cfg.data.cache_dir,
                                                                    cfg.model.vocab_size))


def instruct_prompts(cfg: Any) -> InstructPrompts:
    """The instruction set sized by ``rl.train_prompts`` / ``rl.heldout_prompts``, in the run's
    tokenizer."""
    r = cfg.rl
    tokenizer = run_tokenizer(cfg)
    families = tasks.parse_families(r.families)
    return InstructPrompts(tokenizer, r.train_prompts, r.heldout_prompts, cfg.train.seed,
                           families, r.format_credit)


def load_prompt_set(cfg: Any) -> PromptSet:
    """The prompt set named by ``rl.prompts`` (``module:factory``), built from the config."""
    spec = cfg.rl.prompts
    module, _, name = spec.partition(":")
    try:
        factory: Callable[..., PromptSet] = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"config field 'rl.prompts': cannot import {spec!r} "
                          f"(expected module:factory): {e}") from e
    prompts = factory(cfg)
    for split in SPLITS:
        if not prompts.prompts(split):
            raise ConfigError(f"config field 'rl.prompts': {spec} has no {split} prompts")
    return prompts
