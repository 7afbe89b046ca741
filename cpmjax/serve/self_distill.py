"""The target model's own continuations of corpus prompts, as training data for its speculative
draft (self-distillation, as Medusa-2 trains its heads: arXiv:2401.10774 §2.3.2).

A draft is judged by how often the target accepts its proposals, so it should see the target's
generations, not only human text: a draft trained on the corpus alone never predicted the tiny
target's greedy repetition loops.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpmjax.atomic import atomic_file
from cpmjax.data.corpus import build_default_corpus
from cpmjax.data.pipeline import tokenize_documents
from cpmjax.data.sources import read_documents
from cpmjax.data.tokenizer import get_or_build_default_tokenizer, load_tokenizer
from cpmjax.serve.generate import run_requests
from cpmjax.serve.sampling import SamplingParams
from cpmjax.train.checkpoint import load_trained_model


def write_self_distill_data(checkpoint: str, out: str | Path, *, prompts: int, prompt_len: int,
                            new_tokens: int, temperatures: list[float],
                            cache_dir: str) -> tuple[int, int]:
    """Write ``{"text": prompt + continuation}`` lines to ``out`` (atomically).

    Prompts are the first ``prompt_len`` tokens of the default corpus's training documents;
    continuations cycle over ``temperatures`` (0 = greedy) through the serving engine. Returns
    (continuations, generated tokens). Raises FileNotFoundError for a missing checkpoint.
    """
    cfg, params = load_trained_model(checkpoint)
    tok_path = str(get_or_build_default_tokenizer(cache_dir, cfg.vocab_size))
    docs = read_documents(str(build_default_corpus(cache_dir) / "train.jsonl"), "jsonl")
    heads = [list(map(int, t[:prompt_len]))
             for t in tokenize_documents(docs, tok_path) if len(t) >= prompt_len][:prompts]
    sampling = [SamplingParams(temperatures[i % len(temperatures)], seed=i)
                for i in range(len(heads))]
    reqs = run_requests(cfg, params, heads, new_tokens, sampling)
    tok = load_tokenizer(tok_path)
    with atomic_file(Path(out)) as f:
        for p, r in zip(heads, reqs):
            f.write(json.dumps({"text": tok.decode(p + r.output, skip_special_tokens=True)}) + "\n")
    return len(reqs), sum(len(r.output) for r in reqs)
