"""Offline batch generation (``cpmjax.Model.generate``) through the serving engine's code path."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax.numpy as jnp

from cpmjax.config import ModelConfig
from cpmjax.model.params import Params
from cpmjax.serve.engine import DecodeEngine
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import Scheduler
from cpmjax.serve.speculative import speculative_generate


def _bucket(n: int, lo: int) -> int:
    """Smallest power of two times ``lo`` that is >= n: few distinct shapes, so few compilations."""
    b = lo
    while b < n:
        b *= 2
    return b


@functools.lru_cache(maxsize=8)
def engine_for(cfg: ModelConfig, max_slots: int, max_len: int, chunk: int,
               dtype_name: str) -> DecodeEngine:
    """One engine (and its compiled steps) per static shape, reused across calls."""
    return DecodeEngine(cfg, max_slots=max_slots, max_len=max_len, chunk=chunk,
                        dtype=jnp.dtype(dtype_name))


@dataclasses.dataclass(frozen=True)
class Speculative:
    """Speculative decoding settings for :func:`generate`: the MTP/EAGLE draft head's params
    (``cpmjax.model.mtp``), the draft length k and an optional FR-Spec id list."""

    draft_params: Params
    k: int = 3
    frspec_ids: Any = None


def _speculative(cfg: ModelConfig, params: Params, prompts: list[list[int]], max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                 seed: int, stop_token_ids: Sequence[int] | None,
                 spec: Speculative) -> list[list[int]]:
    """Speculative generation, cut after the first stop/eos token like the plain path."""
    if not isinstance(spec, Speculative):
        raise TypeError(f"speculative must be a cpmjax.serve.generate.Speculative, got "
                        f"{type(spec).__name__}")
    if (top_k, top_p, repetition_penalty) != (0, 1.0, 1.0):
        raise ValueError("speculative decoding supports greedy and temperature sampling only "
                         "(top_k=0, top_p=1, repetition_penalty=1)")
    tokens, _ = speculative_generate(cfg, params, spec.draft_params, prompts, max_new_tokens,
                                     k=spec.k, temperature=temperature, seed=seed,
                                     frspec_ids=spec.frspec_ids)
    stops = set(cfg.eos_token_ids) | set(stop_token_ids or ())
    out = []
    for row in tokens.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


def generate(cfg: ModelConfig, params: Params, prompts: list[list[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int = 0,
             stop_token_ids: Sequence[int] | None = None, speculative: Any = None, *,
             max_slots: int = 8, chunk: int = 64, dtype: Any = jnp.float32) -> list[list[int]]:
    """Generated ids per prompt (without the prompt; a final stop/eos token is kept, as in HF).

    Prompt ``i`` uses seed ``seed + i`` so that equal prompts in one call still sample
    independently, and a prompt's output does not depend on the other prompts.
    """
    if not prompts:
        return []
    if speculative is not None:
        return _speculative(cfg, params, prompts, max_new_tokens, temperature, top_k, top_p,
                            repetition_penalty, seed, stop_token_ids, speculative)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt plus max_new_tokens ({longest}) exceeds the model context "
                         f"{cfg.max_position_embeddings}")
    max_len = min(_bucket(longest, 128), cfg.max_position_embeddings)
    slots = min(_bucket(len(prompts), 1), max_slots)
    engine = engine_for(cfg, slots, max_len, chunk, jnp.dtype(dtype).name)
    sched = Scheduler(engine, params, max_queue=len(prompts))
    reqs = [sched.submit(p, max_new_tokens,
                         SamplingParams(temperature, top_k, top_p, repetition_penalty, seed + i),
                         stop_token_ids) for i, p in enumerate(prompts)]
    sched.run_until_done()
    return [r.output for r in reqs]
