"""Evaluate supervised fine-tuning on the instruction set's held-out split, before and after:
``python launch/sft_eval.py [--base=runs/tiny] [--tuned=runs/sft_tiny]
[--out=bench/results/sft_tiny.json]``.

For each model: the held-out assistant-token loss (and perplexity) and the exact-match accuracy
of greedy answers generated through the serving engine with the chat template, overall and per
task family (``cpmjax.posttrain.evaluate``). Needs the main job's run (``configs/tiny.py``) and
the SFT run (``configs/sft_tiny.py``).
"""

from __future__ import annotations

import platform
import sys
import time

import jax
from absl import app, flags, logging

from cpmjax.atomic import write_json
from cpmjax.posttrain.evaluate import evaluate_chat_model, load_heldout
from cpmjax.train.checkpoint import load_trained_model

flags.DEFINE_string("base", "runs/tiny", "the model before fine-tuning")
flags.DEFINE_string("tuned", "runs/sft_tiny", "the fine-tuned model")
flags.DEFINE_string("heldout", "", "held-out examples JSONL (default: the project's set)")
flags.DEFINE_list("families", [], "held-out problems of these instruction-set families only "
                  "(default: the default set)")
flags.DEFINE_integer("n", 0, "evaluate the first n held-out examples (0 = all)")
flags.DEFINE_integer("seq_len", 256, "row length for the held-out loss")
flags.DEFINE_string("cache_dir", ".cache/cpmjax", "corpus, tokenizer and instruction-set cache")
flags.DEFINE_string("out", "bench/results/sft_tiny.json", "results file (written atomically)")


def main(argv: list[str]) -> int:
    del argv
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    if f.heldout and f.families:
        raise app.UsageError("give --heldout or --families, not both")
    results = {}
    for name, path in (("base", f.base), ("tuned", f.tuned)):
        try:
            cfg, params = load_trained_model(path)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        held = load_heldout(f.cache_dir, cfg.vocab_size, f.seq_len, f.heldout or None, f.n,
                            f.families or None)
        t0 = time.perf_counter()
        r = results[name] = {"checkpoint": path,
                             **evaluate_chat_model(cfg, params, held.tokenizer, held.examples,
                                                   held.rows)}
        print(f"{name} ({path}): held-out assistant loss {r['assistant_loss']:.4f}, accuracy "
              f"{r['accuracy']:.1%} ({r['n']} examples, {time.perf_counter() - t0:.0f}s)")
        for family, acc in r["by_family"].items():
            print(f"  {family:>10}: {acc:.1%}")
    report = {"heldout": held.path, "n": len(held.examples),
              "device": f"{jax.default_backend()} ({platform.processor() or platform.machine()})",
              "results": results}
    print(f"wrote {write_json(f.out, report, indent=1)}")
    return 0


if __name__ == "__main__":
    app.run(main)
