"""BitCPM ternary QAT figures: ``python launch/bitcpm_eval.py [--fp=runs/sft_tiny]
[--qat=runs/bitcpm_tiny] [--out=bench/results/bitcpm_tiny.json]``.

Rows: the full-precision model, its ternary rounding without QAT (plain absmean rounding with the
QAT run's settings), the ternary model after QAT (both served packed, 2 bits per weight) and,
with ``--fp_continued``, the control that trains the fp model as many more steps without QAT:
held-out assistant-token loss and perplexity and instruction-set accuracy (greedy, through the
serving engine; ``cpmjax.posttrain.evaluate``). Also the QAT train-step time overhead next to the
fp step (side by side in this process) and model bytes fp vs packed. Needs the SFT run
(``configs/sft_tiny.py``) and the QAT run (``configs/bitcpm_tiny.py``).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging

from cpmjax.atomic import write_json
from cpmjax.posttrain.evaluate import evaluate_chat_model, load_heldout
from cpmjax.quant import ternary
from cpmjax.quant.ternary_eval import model_bytes, step_time_overhead
from cpmjax.train.checkpoint import load_trained_model

flags.DEFINE_string("fp", "runs/sft_tiny", "the full-precision model QAT started from")
flags.DEFINE_string("qat", "runs/bitcpm_tiny", "the ternary QAT run")
flags.DEFINE_string("fp_continued", "", "control: the same run as --qat with qat.enabled=False "
                    "(as many more full-precision steps on the same data)")
flags.DEFINE_integer("n", 0, "evaluate the first n held-out examples (0 = all)")
flags.DEFINE_integer("rounds", 7, "timing rounds (fp and QAT steps alternate)")
flags.DEFINE_string("cache_dir", ".cache/cpmjax", "corpus, tokenizer and instruction-set cache")
flags.DEFINE_string("out", "bench/results/bitcpm_tiny.json", "results file (written atomically)")


def main(argv: list[str]) -> int:
    del argv
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    try:
        cfg, fp_params = load_trained_model(f.fp)
        qat_cfg, qat_params = load_trained_model(f.qat)
        tc = ternary.ternary_config_of_run(f.qat)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if qat_cfg != cfg:
        print(f"error: {f.qat} is not a QAT run of the model at {f.fp}", file=sys.stderr)
        return 1
    experiment = ml_collections.ConfigDict(
        json.loads((Path(f.qat) / "experiment.json").read_text()))
    held = load_heldout(f.cache_dir, cfg.vocab_size, experiment.train.seq_len, n=f.n)
    packed_qat = ternary.pack_params(qat_params, tc)
    models = {"fp": fp_params, "ternary_plain_rounding": ternary.pack_params(fp_params, tc),
              "ternary_qat": packed_qat}
    if f.fp_continued:
        cont_cfg, models["fp_continued"] = load_trained_model(f.fp_continued)
        if cont_cfg != cfg:
            print(f"error: {f.fp_continued} is not a run of the model at {f.fp}", file=sys.stderr)
            return 1
    results = {}
    for name, params in models.items():
        r = results[name] = evaluate_chat_model(cfg, params, held.tokenizer, held.examples,
                                                held.rows)
        print(f"{name}: held-out assistant loss {r['assistant_loss']:.4f} (ppl "
              f"{r['assistant_ppl']:.3f}), accuracy {r['accuracy']:.1%}")
    t = experiment.train
    timing = step_time_overhead(cfg, t, tc, batch=t.global_batch_size, seq=t.seq_len,
                                rounds=f.rounds)
    print(f"train step: fp {timing['fp_step_s'] * 1e3:.1f} ms, QAT "
          f"{timing['qat_step_s'] * 1e3:.1f} ms, overhead {timing['overhead']:+.1%}")
    sizes = model_bytes(fp_params, packed_qat)
    print(f"bytes: fp32 {sizes['fp32']}, bf16 {sizes['bf16']}, packed {sizes['packed']} "
          f"(decoder linears {sizes['linears_fp32']} -> {sizes['linears_packed']})")
    fp_acc = results["fp"]["accuracy"]
    cont_acc = results.get("fp_continued", {}).get("accuracy")
    report = {"fp": f.fp, "qat": f.qat, "ternary": tc.to_dict(), "heldout": held.path,
              "n": len(held.examples), "results": results, "step_time": timing, "bytes": sizes,
              "accuracy_retained": results["ternary_qat"]["accuracy"] / fp_acc if fp_acc else None,
              "accuracy_retained_vs_continued": (results["ternary_qat"]["accuracy"] / cont_acc
                                                 if cont_acc else None),
              "device": f"{jax.default_backend()} "
                        f"({platform.processor() or platform.machine()}), shared machine"}
    print(f"wrote {write_json(f.out, report, indent=1)}")
    return 0


if __name__ == "__main__":
    app.run(main)
