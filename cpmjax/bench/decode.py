"""Decode-throughput benchmark: the cpmjax serving engine vs HF transformers ``generate``.

    python launch/bench.py decode  # tiny, small; 8 requests of 64 and of 896 prompt tokens,
                                   # batch 1 and 8; plain, speculative and HF

The tiny model is the trained one (``runs/tiny`` and its draft ``runs/tiny_draft``, from
``launch/train.py --config=configs/tiny.py`` then ``--config=configs/tiny_draft.py``) when those
runs exist, with held-out corpus prompts; otherwise, and for ``small``, random weights with an
untrained draft (whose acceptance is a lower bound).

Both sides run the same weights in the same process on this machine: the cpmjax params are exported
with ``cpmjax.convert.save_hf(..., format="llama")`` (muP scales folded in) and loaded as
``transformers.LlamaForCausalLM``. Both decode greedily, float32, ``new_tokens`` tokens after a
``prompt_len``-token prompt, timed after a warm-up pass (compilation excluded). cpmjax goes through
the real serving path (``Scheduler`` over ``DecodeEngine``: chunked prefill, insert, all-slot decode
step, host-side stop checks). Rows are appended as JSON lines to ``bench/results/decode_cpu.jsonl``.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from cpmjax import presets
from cpmjax.bench.common import RESULTS
from cpmjax.config import ModelConfig
from cpmjax.convert import save_hf
from cpmjax.model import init_params
from cpmjax.serve.scheduler import Scheduler
from cpmjax.serve.spec_engine import Speculative, make_engine


def _prompts(cfg: ModelConfig, batch: int, prompt_len: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()


class Timing(NamedTuple):
    """One timed pass over all prompts: end to end, and its decode part alone (after each
    request's first token, which comes with its prefill)."""

    seconds: float
    tokens: int
    decode_seconds: float
    decode_tokens: int
    accept: float = 1.0  # mean accept length (speculative)
    steps: int | None = None  # engine decode steps, each over all slots (cpmjax)
    host_mask_seconds: float = 0.0  # constrained decoding: writing the masks on the host
    kinds: Any = None  # tree engines: {step kind: steps run} over the timed pass


REPEATS = 3  # timed passes per row, the fastest kept: this shared 2-core VM's timings wander


def _fastest(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.decode_seconds)


def time_cpmjax(cfg: ModelConfig, params: Any, prompts: list[list[int]], new_tokens: int,
                batch: int, speculative: Speculative | None = None,
                grammar: Any = None, kv_bucket: int | None = 128,
                max_len: int | None = None) -> Timing:
    """All ``prompts`` through the scheduler on ``batch`` slots (fewer slots than prompts: the
    rest queue, as a server's would), the fastest of ``REPEATS`` passes after a warm-up; the
    decode part is the time spent in the engine's decode steps. Arguments as for
    :func:`cpmjax_pass`."""
    once = cpmjax_pass(cfg, params, prompts, new_tokens, batch, speculative, grammar, kv_bucket,
                       max_len)
    return _fastest([once() for _ in range(REPEATS)])


def cpmjax_pass(cfg: ModelConfig, params: Any, prompts: list[list[int]], new_tokens: int,
                batch: int, speculative: Speculative | None = None,
                grammar: Any = None, kv_bucket: int | None = 128,
                max_len: int | None = None) -> Callable[[], Timing]:
    """A function timing one pass of all ``prompts`` through the scheduler on ``batch`` slots,
    after a warm-up pass (compilation) run here. ``speculative`` runs the draft-and-verify
    engine; ``grammar`` (a callable making one matcher per request) constrains every request,
    and its host-side mask writing is added to the decode time (``host``). ``kv_bucket``: the
    engine's cache-span buckets (None: every step reads the whole cache). ``max_len``: the
    engine's cache length (None: the longest request plus the positions a speculative step
    writes ahead)."""
    if max_len is None:
        extra = 0 if speculative is None else speculative.lookahead  # positions written ahead
        max_len = max(len(p) for p in prompts) + new_tokens + 1 + extra
    engine = make_engine(cfg, speculative, max_slots=batch, kv_bucket=kv_bucket,
                         max_len=max_len, chunk=64)
    step, in_steps = engine.generate, [0.0, 0]  # seconds, calls

    def timed_step(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = jax.block_until_ready(step(*args, **kw))
        in_steps[0] += time.perf_counter() - t
        in_steps[1] += 1
        return out

    engine.generate = timed_step

    host = [0.0]  # seconds writing grammar masks on the host

    def matcher() -> Any:
        m = grammar()
        fill = m.fill

        def timed_fill(row: Any) -> None:
            t = time.perf_counter()
            fill(row)
            host[0] += time.perf_counter() - t

        m.fill = timed_fill
        return m

    def once() -> Timing:
        policy = getattr(engine, "policy", None)
        chosen = dict(policy.chosen) if policy is not None else None
        sched = Scheduler(engine, params, max_queue=len(prompts))
        reqs = [sched.submit(p, new_tokens, stop_token_ids=[], ignore_eos=True,
                             grammar=None if grammar is None else matcher()) for p in prompts]
        in_steps[:] = [0.0, 0]
        host[0] = 0.0
        t = time.perf_counter()
        sched.run_until_done()
        n = sum(len(r.output) for r in reqs)
        return Timing(time.perf_counter() - t, n, in_steps[0] + host[0], n - len(reqs),
                      sched.step_tokens / max(sched.decode_steps, 1), in_steps[1], host[0],
                      None if chosen is None else {
                          str(tuple(engine.kinds[k])): n - chosen.get(k, 0)
                          for k, n in policy.chosen.items()})

    once()
    return once


def time_hf(folder: Path, prompts: list[list[int]], new_tokens: int, batch: int) -> Timing:
    """``LlamaForCausalLM.generate`` (greedy, KV cache on) over ``prompts`` in batches of
    ``batch``, the fastest of ``REPEATS`` passes after a warm-up batch (`hf_pass`)."""
    once = hf_pass(folder, prompts, new_tokens, batch)
    return _fastest([once() for _ in range(REPEATS)])


def hf_pass(folder: Path, prompts: list[list[int]], new_tokens: int, batch: int
            ) -> Callable[[], Timing]:
    """A function timing one pass of ``LlamaForCausalLM.generate`` (greedy, KV cache on) over
    ``prompts`` in batches of ``batch``, after a warm-up batch run here; a pass's decode part is
    the time of generating ``new_tokens`` minus that of generating one (the prefill and first
    token)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    groups = [torch.tensor(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]

    def gen(ids: Any, n: int) -> tuple[float, int]:
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - t, int((out.shape[1] - ids.shape[1]) * ids.shape[0])

    @torch.inference_mode()
    def once() -> Timing:
        full = [gen(ids, new_tokens) for ids in groups]
        first = [gen(ids, 1) for ids in groups]
        seconds, tokens = sum(t for t, _ in full), sum(n for _, n in full)
        return Timing(seconds, tokens, seconds - sum(t for t, _ in first),
                      tokens - sum(n for _, n in first))

    with torch.inference_mode():
        gen(groups[0], new_tokens)
    return once


def interleaved(passes: list[Callable[[], Timing]], repeats: int) -> list[list[Timing]]:
    """``repeats`` timed passes of each of ``passes``, run round-robin (one pass of each, then
    again): on this shared 2-core VM the speed drifts by tens of percent over a minute (the
    same chain round timed 0.85 and 1.19 ms a step in two back-to-back rows), so variants timed
    in blocks one after another compare different moments of the machine."""
    timings: list[list[Timing]] = [[] for _ in passes]
    for _ in range(repeats):
        for once, out in zip(passes, timings):
            out.append(once())
    return timings


# the README's jobs: target, draft, FR-Spec ranking (launch/build_frspec.py, used if present)
TRAINED = {"tiny": ("runs/tiny", "runs/tiny_draft/draft.safetensors", "runs/tiny_draft/frspec.npy")}


def _corpus_prompts(batch: int, prompt_len: int) -> list[list[int]]:
    """The first ``prompt_len`` tokens of held-out documents of the default corpus."""
    from cpmjax.data.corpus import build_default_corpus
    from cpmjax.data.pipeline import tokenize_documents
    from cpmjax.data.sources import read_documents
    from cpmjax.data.tokenizer import get_or_build_default_tokenizer

    cache = ".cache/cpmjax"
    docs = read_documents(str(build_default_corpus(cache) / "valid.jsonl"), "jsonl")
    toks = tokenize_documents(docs, str(get_or_build_default_tokenizer(cache)))
    rows = [list(map(int, t[:prompt_len])) for t in toks if len(t) >= prompt_len][:batch]
    if len(rows) < batch:
        raise ValueError(f"the held-out split has fewer than {batch} documents of {prompt_len} "
                         "tokens")
    return rows


def _model(name: str, k: int) -> tuple[ModelConfig, Any, Speculative, str, Any]:
    """(cfg, params, speculative settings, provenance, prompt maker): the trained tiny model, its
    draft and FR-Spec ranking when the README's jobs have written them, else random weights and an
    untrained draft."""
    from cpmjax.model.mtp import draft_form_of, init_mtp_params, load_mtp
    from cpmjax.serve.frspec import load_frspec
    from cpmjax.train.checkpoint import load_model

    target, draft, frspec = TRAINED.get(name, (None, None, None))
    if target and Path(target).exists() and Path(draft).is_file():
        cfg, params = load_model(target)
        ids = load_frspec(frspec, cfg.vocab_size) if Path(frspec).is_file() else None
        return (cfg, params, Speculative(load_mtp(cfg, draft), k, ids, draft_form_of(draft)),
                f"trained ({target}, {draft}, frspec {'none' if ids is None else len(ids)})",
                _corpus_prompts)
    cfg = ModelConfig.from_hf_config(presets.PRESETS[name]())
    return (cfg, init_params(cfg, jax.random.PRNGKey(0)),
            Speculative(init_mtp_params(cfg, jax.random.key(1)), k),
            "random weights, untrained draft", lambda b, n: _prompts(cfg, b, n))


def run(presets_: tuple[str, ...] = ("tiny", "small"), batches: tuple[int, ...] = (1, 8),
        requests: int = 8, prompt_lens: tuple[int, ...] = (64, 896), new_tokens: int = 64,
        torch_threads: int = 1, spec_k: int = 3, write: bool = True) -> list[dict[str, Any]]:
    """Benchmark rows (preset x prompt length x batch x {cpmjax plain, cpmjax speculative, HF});
    appended to decode_<platform>.jsonl. Every row decodes the same ``requests`` prompts,
    ``batch`` at a time (batch 1 over several prompts: one prompt's acceptance says little), once
    per prompt length: short prompts, and long ones near the tiny model's 1024-token context,
    where each decode step reads a long KV cache (the memory-bound case speculative decoding is
    for: one verify pass reads it once for k+1 tokens).

    ``tokens_per_s`` is end to end (prefills included); ``decode_tokens_per_s`` counts the decode
    part only (`Timing`), which is what speculative decoding changes. cpmjax rows carry the time
    per engine decode step over all slots (a speculative step is one draft-and-verify round);
    speculative rows the mean accept length and both speedups over the plain row measured just
    before in the same process.

    ``torch_threads=1`` is the baseline's best setting on the shared 2-core CPU machine: with 2
    threads HF generate of the tiny model ran 9x slower (8 vs 72 tok/s, measured 22 Nov 2026 under
    load), so 1 thread keeps the comparison fair to HF.
    """
    import torch

    torch.set_num_threads(torch_threads)

    rows = []
    for name in presets_:
        cfg, params, spec, source, make_prompts = _model(name, spec_k)
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_hf(cfg, params, Path(tmp) / "llama", format="llama")
            for prompt_len, batch in itertools.product(prompt_lens, batches):
                prompts = make_prompts(requests, prompt_len)
                runs = (("cpmjax", "plain",
                         lambda: time_cpmjax(cfg, params, prompts, new_tokens, batch)),
                        ("cpmjax", "speculative",
                         lambda: time_cpmjax(cfg, params, prompts, new_tokens, batch, spec)),
                        ("hf_transformers", "plain",
                         lambda: time_hf(folder, prompts, new_tokens, batch)))
                for impl, decoding, fn in runs:
                    r = fn()
                    row = {"bench": "decode", "impl": impl, "preset": name, "batch": batch,
                           "requests": len(prompts), "prompt_len": prompt_len,
                           "new_tokens": new_tokens, "decoding": decoding, "dtype": "float32",
                           "seconds": r.seconds, "tokens": r.tokens,
                           "tokens_per_s": r.tokens / r.seconds,
                           "decode_tokens_per_s": r.decode_tokens / r.decode_seconds,
                           "weights": source, "device": jax.devices()[0].device_kind,
                           "platform": jax.default_backend(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    if r.steps:
                        row["ms_per_decode_step"] = 1e3 * r.decode_seconds / r.steps
                    if decoding == "speculative":
                        plain = rows[-1]
                        row.update(k=spec_k, mean_accept_length=r.accept,
                                   frspec_size=None if spec.frspec_ids is None
                                   else len(spec.frspec_ids),
                                   speedup_vs_plain=row["tokens_per_s"] / plain["tokens_per_s"],
                                   decode_speedup_vs_plain=row["decode_tokens_per_s"]
                                   / plain["decode_tokens_per_s"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    rows += run_constrained(write=False)
    if write:
        _append(rows)
    return rows


def _add_row(rows: list[dict[str, Any]], row: dict[str, Any], base: dict[str, Any],
             ratio: str) -> dict[str, Any]:
    """Append and print ``row`` with its decode tok/s over ``base``'s as ``ratio``; ``base``."""
    row[ratio] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    rows.append(row)
    print(json.dumps(row), flush=True)
    return base


def _machine() -> dict[str, Any]:
    """Where and when a row was measured (the load matters on this shared machine)."""
    return {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _append(rows: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"decode_{jax.default_backend()}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# a string: a random model stays inside it for the whole run, where almost every token is
# allowed (the largest masks to write)
CONSTRAINED_SCHEMA = {"type": "string"}


def run_constrained(batches: tuple[int, ...] = (1, 8), requests: int = 8, prompt_len: int = 64,
                    new_tokens: int = 64, write: bool = True) -> list[dict[str, Any]]:
    """Per-step cost of constrained decoding on the tiny model: the same requests plain and with
    a JSON-schema grammar (outlines-core matchers writing each slot's bitmask on the host, the
    mask applied to the logits inside the jitted step), side by side in one process."""
    from cpmjax.data.tokenizer import get_or_build_default_tokenizer, load_tokenizer
    from cpmjax.serve.detokenize import token_table
    from cpmjax.serve.grammar import Grammars

    cfg, params, _, source, make_prompts = _model("tiny", 3)
    tok = load_tokenizer(get_or_build_default_tokenizer(".cache/cpmjax", cfg.vocab_size))
    grammars = Grammars(token_table(tok), cfg.vocab_size)
    index = grammars.json_schema(CONSTRAINED_SCHEMA, cfg.eos_token_ids[0])
    rows = []
    for batch in batches:
        prompts = make_prompts(requests, prompt_len)
        plain = time_cpmjax(cfg, params, prompts, new_tokens, batch)
        masked = time_cpmjax(cfg, params, prompts, new_tokens, batch,
                             grammar=lambda: grammars.matcher(index))
        step = {k: 1e3 * t.decode_seconds / t.steps for k, t in (("plain", plain),
                                                                  ("constrained", masked))}
        row = {"bench": "decode", "impl": "cpmjax", "preset": "tiny", "batch": batch,
               "requests": requests, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "decoding": "constrained", "grammar": "outlines-core json_schema",
               "schema": CONSTRAINED_SCHEMA, "ms_per_decode_step": step["constrained"],
               "ms_per_decode_step_plain": step["plain"],
               "ms_host_mask_per_step": 1e3 * masked.host_mask_seconds / masked.steps,
               "mask_overhead_ratio": step["constrained"] / step["plain"],
               "weights": source, "device": jax.devices()[0].device_kind,
               "platform": jax.default_backend(), "cpu_count": os.cpu_count(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if write:
        _append(rows)
    return rows


if __name__ == "__main__":
    run()


def run_quantized(presets_: tuple[str, ...] = ("tiny", "small"), batches: tuple[int, ...] = (1, 8),
                  requests: int = 8, prompt_len: int = 64, new_tokens: int = 64,
                  write: bool = True) -> list[dict[str, Any]]:
    """Plain decoding with float32 weights next to the same model's int8 / int4 (RTN, group 128)
    and packed ternary (BitCPM, group 128) decoder linears, read inside each matmul
    (`cpmjax.quant.qlinear`); same prompts, same process. Rows carry tok/s and the ratio to the
    float32 row of their batch. On CPU XLA writes the dequantized operand of every matmul, so
    this measures what unpacking costs there, not the bandwidth a TPU or GPU would save."""
    from cpmjax.quant.qforward import quantize_params
    from cpmjax.quant.ternary import TernaryConfig, pack_params

    rows = []
    for name in presets_:
        cfg, params, _, source, make_prompts = _model(name, 1)
        variants = (("float32", params),
                    ("int8", quantize_params(cfg, params, "rtn", bits=8)),
                    ("int4", quantize_params(cfg, params, "rtn", bits=4)),
                    ("ternary", pack_params(params, TernaryConfig())))
        for batch in batches:
            prompts = make_prompts(requests, prompt_len)
            base = None
            for weights, p in variants:
                r = time_cpmjax(cfg, p, prompts, new_tokens, batch)
                row = {"bench": "decode_quant", "impl": "cpmjax", "preset": name,
                       "batch": batch, "requests": len(prompts), "prompt_len": prompt_len,
                       "new_tokens": new_tokens, "weights_format": weights,
                       "tokens_per_s": r.tokens / r.seconds,
                       "decode_tokens_per_s": r.decode_tokens / r.decode_seconds,
                       "ms_per_decode_step": 1e3 * r.decode_seconds / max(r.steps, 1),
                       "weights": source, **_machine()}
                base = _add_row(rows, row, base or row, "decode_ratio_vs_float32")
    if write:
        _append(rows)
    return rows


TREES = ((4, 2, 8), (4, 4, 16), (6, 4, 24))  # (depth, topk, size) of the tree rows


def run_tree(batches: tuple[int, ...] = (1, 8), requests: int = 8, prompt_len: int = 64,
             new_tokens: int = 64, trees: tuple[tuple[int, int, int], ...] = TREES,
             weights: tuple[str, ...] = ("float32", "int4"), torch_threads: int = 1,
             repeats: int = 6, write: bool = True) -> list[dict[str, Any]]:
    """Tree speculative decoding (``cpmjax.serve.tree_engine``) next to plain decoding, the chain
    (k=3) and HF transformers ``generate`` on the same weights, in one process: per batch size
    and target weights (float32, or int4 RTN decoder linears), rows for plain, chain, every
    tree of ``trees`` always run (policy ``fixed``), and the first tree under the ``measured``
    policy (the tree, a chain of any length up to its depth, or plain, per step, from measured
    step costs). Every engine reads its whole cache each step (``kv_bucket=None``), so each
    step kind compiles in the warm-up pass, and every engine of a run gets the same cache
    length (the requests plus the largest lookahead of the variants, as one server's
    ``max_len`` would serve either engine): with the whole cache read each step, a plain engine
    given a shorter cache would be timed at another attention width. Rows carry tok/s, the mean
    accept length, the speedup over the plain row of the same batch and weights and, for the
    measured rows, how often each step kind ran. The variants of one batch size and weights are
    timed round-robin, ``repeats`` passes each, the fastest and the median pass kept
    (`interleaved`)."""
    import dataclasses

    import torch

    from cpmjax.quant.qforward import quantize_params

    torch.set_num_threads(torch_threads)
    cfg, params, spec, source, make_prompts = _model("tiny", 3)
    chain = dataclasses.replace(spec, k=3)
    variants = [("chain k=3", chain)] + [
        (f"tree {t}", dataclasses.replace(spec, tree=t, policy="fixed")) for t in trees] + [
        (f"tree {trees[0]} measured", dataclasses.replace(spec, tree=trees[0]))]
    rows = []
    max_len = prompt_len + new_tokens + 1 + max(v.lookahead for _, v in variants)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf(cfg, params, Path(tmp) / "llama", format="llama")
        for batch, fmt in itertools.product(batches, weights):
            p = params if fmt == "float32" else quantize_params(cfg, params, "rtn", bits=4)
            prompts = make_prompts(requests, prompt_len)
            base = None
            runs = [("cpmjax", "plain", None)] + [("cpmjax", n, v) for n, v in variants]
            if fmt == "float32":
                runs.append(("hf_transformers", "plain", "hf"))
            passes = [hf_pass(folder, prompts, new_tokens, batch) if sp == "hf" else
                      cpmjax_pass(cfg, p, prompts, new_tokens, batch, sp, kv_bucket=None,
                                  max_len=max_len) for _, _, sp in runs]
            for (impl, decoding, _), timed in zip(runs, interleaved(passes, repeats)):
                r = _fastest(timed)
                row = {"bench": "decode_tree", "impl": impl, "preset": "tiny", "batch": batch,
                       "requests": len(prompts), "prompt_len": prompt_len,
                       "new_tokens": new_tokens, "decoding": decoding, "weights_format": fmt,
                       "cache_len": None if impl != "cpmjax" else max_len,
                       "decode_tokens_per_s": r.decode_tokens / r.decode_seconds,
                       # the median pass too: the fastest of a measured engine's passes may be
                       # one without a re-try of the slower kinds, which every pass pays in time
                       "decode_tokens_per_s_median": float(np.median(
                           [t.decode_tokens / t.decode_seconds for t in timed])),
                       "tokens_per_s": r.tokens / r.seconds, "mean_accept_length": r.accept,
                       "passes": repeats, "timing": "interleaved", "weights": source,
                       **_machine()}
                if r.kinds and decoding.endswith("measured"):
                    row["steps_by_kind"] = r.kinds
                if r.steps:
                    row["ms_per_decode_step"] = 1e3 * r.decode_seconds / r.steps
                row["median_speedup_vs_plain"] = (row["decode_tokens_per_s_median"]
                                                  / (base or row)["decode_tokens_per_s_median"])
                base = _add_row(rows, row, base or row, "decode_speedup_vs_plain")
    if write:
        _append(rows)
    return rows

