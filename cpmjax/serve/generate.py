"""Offline batch generation (``cpmjax.Model.generate``) through the serving engine's code path."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model.params import Params
from cpmjax.quant.qforward import check_spec_quant, is_quantized, is_quantized_draft
from cpmjax.serve.engine import DecodeEngine, pow2_bucket
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import Request, Scheduler
from cpmjax.serve.spec_engine import Speculative, make_engine


@functools.lru_cache(maxsize=8)
def engine_for(cfg: ModelConfig, max_slots: int, max_len: int, chunk: int, dtype_name: str,
               speculative: tuple[Any, ...] | None = None, attn_impl: str = "auto",
               sparse_impl: str = "auto") -> DecodeEngine:
    """One engine (and its compiled steps) per static shape and speculative settings
    (``Speculative.engine_key``), reused across calls; a speculative engine is created without
    a draft, which :func:`run_requests` sets before each use."""
    kw = dict(max_slots=max_slots, max_len=max_len, chunk=chunk, dtype=jnp.dtype(dtype_name),
              attn_impl=attn_impl, sparse_impl=sparse_impl)
    return make_engine(cfg, None if speculative is None else Speculative(None, *speculative),
                       **kw)


def _check_prompts(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> int:
    """The longest prompt plus ``max_new_tokens``, after naming what is wrong with the prompts."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    for p in prompts:
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}), got {bad[0]}")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt plus max_new_tokens ({longest}) exceeds the model context "
                         f"{cfg.max_position_embeddings}")
    return longest


def run_requests(cfg: ModelConfig, params: Params, prompts: list[list[int]],
                 max_new_tokens: int, sampling: list[SamplingParams],
                 stop_token_ids: Sequence[int] | None = None, speculative: Any = None, *,
                 max_slots: int = 8, chunk: int = 64, dtype: Any = jnp.float32,
                 ignore_eos: bool = False, attn_impl: str = "auto",
                 sparse_impl: str = "auto") -> list[Request]:
    """Run every prompt through the scheduler over a cached engine; the finished requests.
    ``attn_impl`` / ``sparse_impl``: attention kernel names (``cpmjax.model.attention``)."""
    if speculative is not None and not isinstance(speculative, Speculative):
        raise TypeError(f"speculative must be a cpmjax.serve.generate.Speculative, got "
                        f"{type(speculative).__name__}")
    longest = _check_prompts(cfg, prompts, max_new_tokens)
    # a speculative step writes positions past the last emitted token: room for them
    extra = 0 if speculative is None else speculative.lookahead
    max_len = min(pow2_bucket(longest + extra, 128), cfg.max_position_embeddings)
    slots = min(pow2_bucket(len(prompts), 1), max_slots)
    engine = engine_for(cfg, slots, max_len, chunk, jnp.dtype(dtype).name,
                        None if speculative is None else speculative.engine_key, attn_impl,
                        sparse_impl)
    if speculative is not None:
        check_spec_quant(is_quantized(params), is_quantized_draft(speculative.draft_params))
        engine.set_draft(speculative.draft_params, speculative.frspec_ids)
    sched = Scheduler(engine, params, max_queue=len(prompts))
    reqs = [sched.submit(p, max_new_tokens, sp, stop_token_ids, ignore_eos=ignore_eos)
            for p, sp in zip(prompts, sampling)]
    sched.run_until_done()
    return reqs


def generate(cfg: ModelConfig, params: Params, prompts: list[list[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int = 0,
             stop_token_ids: Sequence[int] | None = None, speculative: Any = None, *,
             max_slots: int = 8, chunk: int = 64, dtype: Any = jnp.float32,
             attn_impl: str = "auto", sparse_impl: str = "auto") -> list[list[int]]:
    """Generated ids per prompt (without the prompt; a final stop/eos token is kept, as in HF).

    Prompt ``i`` uses seed ``seed + i`` so that equal prompts in one call still sample
    independently, and a prompt's output does not depend on the other prompts. With
    ``speculative=Speculative(draft, k)`` every step drafts and verifies k tokens; the output is
    distributed exactly as without it (greedy: token-identical).
    """
    if not prompts:
        return []
    sampling = [SamplingParams(temperature, top_k, top_p, repetition_penalty, seed + i)
                for i in range(len(prompts))]
    reqs = run_requests(cfg, params, prompts, max_new_tokens, sampling, stop_token_ids,
                        speculative, max_slots=max_slots, chunk=chunk, dtype=dtype,
                        attn_impl=attn_impl, sparse_impl=sparse_impl)
    return [r.output for r in reqs]


def speculative_generate(cfg: ModelConfig, params: Params, draft_params: Params,
                         prompts: Sequence[Sequence[int]], max_new_tokens: int, k: int = 3,
                         temperature: float = 0.0, seed: int = 0, frspec_ids: Any = None,
                         max_slots: int = 256, form: str = "mtp", tree: Any = None,
                         policy: str = "measured", rule: str = "coupled"
                         ) -> tuple[np.ndarray, dict[str, Any]]:
    """Exactly ``max_new_tokens`` per prompt (eos ignored), speculative with draft length ``k``
    (or draft trees of shape ``tree``, with ``policy`` and ``rule``, see `Speculative`):
    (tokens ``[len(prompts), max_new_tokens]`` int32, stats) for experiments and tests.

    stats: ``mean_accept_length`` (CPM.cu's "Mean accept length": tokens per verify step),
    ``verify_steps`` (slot-steps), ``accepted_draft_tokens``.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = [SamplingParams(temperature, seed=seed + i) for i in range(len(prompts))]
    reqs = run_requests(cfg, params, prompts, max_new_tokens, sampling,
                        speculative=Speculative(draft_params, k, frspec_ids, form, tree,
                                                policy, rule),
                        max_slots=max_slots, ignore_eos=True)
    steps = sum(r.decode_steps for r in reqs)
    produced = sum(r.step_tokens for r in reqs)
    return (np.asarray([r.output for r in reqs], np.int32),
            {"verify_steps": steps, "accepted_draft_tokens": produced - steps,
             "mean_accept_length": produced / max(steps, 1)})
