"""Write the target model's own continuations of corpus prompts as JSONL, to train its speculative
draft on (self-distillation data, as Medusa-2, arXiv:2401.10774 §2.3.2, trains its heads):

    python launch/self_distill_data.py --checkpoint=runs/tiny --out=runs/tiny/selfgen.jsonl

Logic: ``cpmjax.serve.self_distill``.
"""

from __future__ import annotations

import sys

from absl import app, flags

from cpmjax.serve.self_distill import write_self_distill_data

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
        n, n_tok = write_self_distill_data(
            _CKPT.value, _OUT.value, prompts=_N.value, prompt_len=_PROMPT_LEN.value,
            new_tokens=_NEW.value, temperatures=[float(t) for t in _TEMPS.value],
            cache_dir=_CACHE.value)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {_OUT.value}: {n} continuations, {n_tok} generated tokens")
    return 0


if __name__ == "__main__":
    app.run(main)
