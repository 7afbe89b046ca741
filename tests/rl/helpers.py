"""Shared pieces of the RL tests: a toy prompt set whose reward a random model already varies on,
and a small RL config around the tiny test model."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import numpy as np

from cpmjax.rl.config import rl_experiment_config
from tests.conftest import tiny_hf_config


class EvenTokens:
    """Prompts of random token ids; reward = share of even ids in the response (stop tokens
    included), so a random policy's samples differ in reward and RL has a signal."""

    def __init__(self, vocab: int, n_train: int, n_heldout: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self._prompts = {s: [rng.integers(6, vocab, int(rng.integers(3, 9))).tolist()
                             for _ in range(n)]
                         for s, n in (("train", n_train), ("heldout", n_heldout))}

    def prompts(self, split: str) -> list[list[int]]:
        return self._prompts[split]

    def reward(self, split: str, index: int, response: list[int]) -> float:
        _kill_when_logged()
        return float(np.mean([t % 2 == 0 for t in response])) if response else 0.0


def _kill_when_logged() -> None:
    """SIGKILL this process once ``CPMJAX_TEST_KILL_METRICS`` (a run's metrics.jsonl) holds step
    ``CPMJAX_TEST_KILL_AFTER``: the resume test's kill lands at a chosen point of the run, in the
    middle of the next step's rollout."""
    path, after = os.environ.get("CPMJAX_TEST_KILL_METRICS"), os.environ.get(
        "CPMJAX_TEST_KILL_AFTER")
    if path and after and os.path.exists(path):
        with open(path) as f:
            if any(json.loads(line)["step"] >= int(after) for line in f if line.strip()):
                os.kill(os.getpid(), signal.SIGKILL)


def even_tokens(cfg: Any) -> EvenTokens:
    return EvenTokens(cfg.model.vocab_size, cfg.rl.train_prompts, cfg.rl.heldout_prompts,
                      cfg.train.seed)


def toy_config(**rl: Any):
    """An RL config over the tiny test model and the toy prompts (no tokenizer needed)."""
    cfg = rl_experiment_config(tiny_hf_config(num_hidden_layers=2), "rl_toy")
    cfg.train.update(lr=3e-3, steps=4, log_every=1, eval_every=100)
    cfg.checkpoint.update(every=2, async_save=False)
    cfg.rl.update(dict(prompts="tests.rl.helpers:even_tokens", train_prompts=32,
                       heldout_prompts=8, group_size=4, groups_per_step=2, rollout_batch=8,
                       chunk_tokens=4, max_response=10, overlong="none", overlong_buffer=4,
                       stop_tokens="", prefill_chunk=32))
    cfg.rl.update(rl)
    return cfg
