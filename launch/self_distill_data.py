"""Write the target model's own continuations of corpus prompts as JSONL, to train its speculative
draft on (self-distillation data, as Medusa-2, arXiv:2401.10774 §2.3.2, trains its heads):

    python launch/self_distill_data.py --checkpoint=runs/tiny --out=runs/tiny/selfgen.jsonl

A draft is judged by how often the target accepts its proposals, so it should see the target's
generations, not only human text: a draft trained on the corpus alone never predicted the tiny
target's greedy repetition loops. Prompts are the first ``--prompt_len`` tokens of training
documents; continuations alternate over ``--temperatures`` (0 = greedy) and run through the
serving engine. Each line is ``{"text": prompt + continuation}``; the file is written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpmjax.atomic import atomic_file  # noqa: E402
from cpmjax.data.corpus import build_default_corpus  # noqa: E402
from cpmjax.data.pipeline import tokenize_documents  # noqa: E402
from cpmjax.data.sources import read_documents  # noqa: E402
from cpmjax.data.tokenizer import get_or_build_default_tokenizer, load_tokenizer  # noqa: E402
from cpmjax.serve.generate import run_requests  # noqa: E402
from cpmjax.serve.sampling import SamplingParams  # noqa: E402
from cpmjax.train.checkpoint import load_trained_model  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint", "runs/tiny", "the target (run dir or checkpoint)")
_OUT = flags.DEFINE_string("out", "runs/tiny/selfgen.jsonl", "output JSONL")
_N = flags.DEFINE_integer("prompts", 512, "number of prompts (training documents)")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "prompt tokens taken from each document")
_NEW = flags.DEFINE_integer("new_tokens", 96, "tokens generated per prompt")
_TEMPS = flags.DEFINE_list("temperatures", ["0", "0.8"], "cycled over the prompts; 0 = greedy")
_CACHE = flags.DEFINE_string("cache_dir", ".cache/cpmjax", "default corpus and tokenizer cache")


def main(argv: list[str]) -> int:
    del argv
    try:
        cfg, params = load_trained_model(_CKPT.value)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok_path = str(get_or_build_default_tokenizer(_CACHE.value, cfg.vocab_size))
    docs = read_documents(str(build_default_corpus(_CACHE.value) / "train.jsonl"), "jsonl")
    prompts = [list(map(int, t[:_PROMPT_LEN.value]))
               for t in tokenize_documents(docs, tok_path) if len(t) >= _PROMPT_LEN.value]
    prompts = prompts[:_N.value]
    temps = [float(t) for t in _TEMPS.value]
    sampling = [SamplingParams(temps[i % len(temps)], seed=i) for i in range(len(prompts))]
    reqs = run_requests(cfg, params, prompts, _NEW.value, sampling)
    tok = load_tokenizer(tok_path)
    out = Path(_OUT.value)
    with atomic_file(out) as f:
        for p, r in zip(prompts, reqs):
            f.write(json.dumps({"text": tok.decode(p + r.output, skip_special_tokens=True)}) + "\n")
    n_tok = sum(len(r.output) for r in reqs)
    print(f"wrote {out}: {len(reqs)} continuations, {n_tok} generated tokens")
    return 0


if __name__ == "__main__":
    app.run(main)
