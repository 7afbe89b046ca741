"""Decode-throughput benchmark: the cpmjax serving engine vs HF transformers ``generate``.

    python launch/bench.py decode     # tiny and small, batch 1 and 8, plain/speculative/HF

The tiny model is the trained one (``runs/tiny`` and its draft ``runs/tiny_draft``, from
``launch/train.py --config=configs/tiny.py`` then ``--config=configs/tiny_draft.py``) when those
runs exist, with held-out corpus prompts; otherwise, and for ``small``, random weights with an
untrained draft (whose acceptance is a lower bound).

Both sides run the same weights in the same process on this machine: the cpmjax params are exported
with ``cpmjax.convert.save_hf(..., format="llama")`` (muP scales folded in) and loaded as
``transformers.LlamaForCausalLM``. Both decode greedily, float32, ``new_tokens`` tokens after a
``prompt_len``-token prompt, timed after a warm-up run (compilation excluded). cpmjax goes through
the real serving path (``Scheduler`` over ``DecodeEngine``: chunked prefill, insert, all-slot decode
step, host-side stop checks). Rows are appended as JSON lines to ``bench/results/decode_cpu.jsonl``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpmjax import presets  # noqa: E402
from cpmjax.config import ModelConfig  # noqa: E402
from cpmjax.convert import save_hf  # noqa: E402
from cpmjax.model import init_params  # noqa: E402
from cpmjax.serve.engine import DecodeEngine  # noqa: E402
from cpmjax.serve.generate import Speculative  # noqa: E402
from cpmjax.serve.spec_engine import SpeculativeEngine  # noqa: E402
from cpmjax.serve.scheduler import Scheduler  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _prompts(cfg: ModelConfig, batch: int, prompt_len: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()


def time_cpmjax(cfg: ModelConfig, params: Any, prompts: list[list[int]], new_tokens: int,
                speculative: Speculative | None = None) -> tuple[float, int, float]:
    """(seconds, generated tokens, mean accept length) for one batch through the scheduler, after
    a warm-up batch; ``speculative`` runs the draft-and-verify engine instead of the plain one."""
    kw = dict(max_slots=len(prompts), max_len=len(prompts[0]) + new_tokens + 1, chunk=64)
    if speculative is None:
        engine = DecodeEngine(cfg, **kw)
    else:
        kw["max_len"] += speculative.k
        engine = SpeculativeEngine(cfg, speculative.draft_params, k=speculative.k,
                                   frspec_ids=speculative.frspec_ids, **kw)

    def once() -> tuple[float, int, float]:
        sched = Scheduler(engine, params, max_queue=len(prompts))
        reqs = [sched.submit(p, new_tokens, stop_token_ids=[], ignore_eos=True) for p in prompts]
        t = time.perf_counter()
        sched.run_until_done()
        return (time.perf_counter() - t, sum(len(r.output) for r in reqs),
                sched.step_tokens / max(sched.decode_steps, 1))

    once()
    return once()


def time_hf(folder: Path, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) for ``LlamaForCausalLM.generate`` (greedy, KV cache on)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, **kw)
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        dt = time.perf_counter() - t
    return dt, int((out.shape[1] - ids.shape[1]) * ids.shape[0])


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
    from cpmjax.model.mtp import init_mtp_params, load_mtp
    from cpmjax.serve.frspec import load_frspec
    from cpmjax.train.checkpoint import load_model

    target, draft, frspec = TRAINED.get(name, (None, None, None))
    if target and Path(target).exists() and Path(draft).is_file():
        cfg, params = load_model(target)
        ids = load_frspec(frspec, cfg.vocab_size) if Path(frspec).is_file() else None
        return (cfg, params, Speculative(load_mtp(cfg, draft), k, ids),
                f"trained ({target}, {draft}, frspec {'none' if ids is None else len(ids)})",
                _corpus_prompts)
    cfg = ModelConfig.from_hf_config(presets.PRESETS[name]())
    return (cfg, init_params(cfg, jax.random.PRNGKey(0)),
            Speculative(init_mtp_params(cfg, jax.random.key(1)), k),
            "random weights, untrained draft", lambda b, n: _prompts(cfg, b, n))


def run(presets_: tuple[str, ...] = ("tiny", "small"), batches: tuple[int, ...] = (1, 8),
        prompt_len: int = 64, new_tokens: int = 64, torch_threads: int = 1, spec_k: int = 3,
        write: bool = True) -> list[dict[str, Any]]:
    """Benchmark rows (preset x batch x {cpmjax plain, cpmjax speculative, HF}); appended to
    decode_<platform>.jsonl. Speculative rows carry the mean accept length and their speedup over
    the plain row measured just before in the same process.

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
            for batch in batches:
                prompts = make_prompts(batch, prompt_len)
                runs = (("cpmjax", "plain", lambda: time_cpmjax(cfg, params, prompts, new_tokens)),
                        ("cpmjax", "speculative",
                         lambda: time_cpmjax(cfg, params, prompts, new_tokens, spec)),
                        ("hf_transformers", "plain",
                         lambda: (*time_hf(folder, prompts, new_tokens), 1.0)))
                for impl, decoding, fn in runs:
                    dt, n, accept = fn()
                    row = {"bench": "decode", "impl": impl, "preset": name, "batch": batch,
                           "prompt_len": prompt_len, "new_tokens": new_tokens,
                           "decoding": decoding, "dtype": "float32", "seconds": dt,
                           "tokens": n, "tokens_per_s": n / dt, "weights": source,
                           "device": jax.devices()[0].device_kind,
                           "platform": jax.default_backend(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    if decoding == "speculative":
                        row.update(k=spec_k, mean_accept_length=accept,
                                   frspec_size=None if spec.frspec_ids is None
                                   else len(spec.frspec_ids),
                                   speedup_vs_plain=row["tokens_per_s"] / rows[-1]["tokens_per_s"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / f"decode_{jax.default_backend()}.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    run()
