"""Held-out perplexity of a model in full precision vs int4 g128 RTN, GPTQ and P-GPTQ (MiniCPM4
report §4.1.2) and ternary (BitCPM, §3.3; ``cpmjax.quant.ternary``):
``python launch/quant_eval.py [--checkpoint=runs/tiny] [--out=bench/results/quant_cpu.json]``.

The ``ternary`` row rounds the checkpoint's decoder linears to {-1, 0, +1} x absmean scales with
no training; ``--ternary_qat=RUN`` adds the row of a ternary QAT run of the same model (trained
with ``configs/bitcpm_tiny.py --config.train.init_from=runs/tiny --config.data.format=text``).

Calibration rows come from the default corpus's train split through the data pipeline
(``cpmjax.data``), evaluation rows from its held-out split. Needs a trained checkpoint (the tiny
main job, ``python launch/train.py --config=configs/tiny.py``, writes ``runs/tiny``).
"""

from __future__ import annotations

import math
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cpmjax.atomic import write_json
from cpmjax.data.corpus import build_default_corpus
from cpmjax.data.pipeline import Source, eval_batches
from cpmjax.data.tokenizer import get_or_build_default_tokenizer
from cpmjax.model import forward
from cpmjax.quant import qforward, quantize_params, ternary
from cpmjax.train.checkpoint import load_trained_model

flags.DEFINE_string("checkpoint", "runs/tiny", "trained model checkpoint or run workdir")
flags.DEFINE_string("out", "bench/results/quant_cpu.json", "results file (written atomically)")
flags.DEFINE_integer("bits", 4, "weight bits (4 or 8)")
flags.DEFINE_integer("group_size", 128, "quantization group along the input dim")
flags.DEFINE_integer("seq_len", 256, "tokens per row")
flags.DEFINE_integer("calib_rows", 32, "calibration rows (train split)")
flags.DEFINE_integer("eval_rows", 32, "held-out rows")
flags.DEFINE_string("cache_dir", ".cache/cpmjax", "default corpus and tokenizer cache")
flags.DEFINE_integer("ternary_group", 128, "ternary row: input rows per absmean scale")
flags.DEFINE_string("ternary_qat", "", "a ternary QAT run of the same model: adds its row")


def _nll(logits: jax.Array, batch: dict) -> tuple[float, float]:
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    return float(jnp.sum(nll * mask)), float(jnp.sum(mask))


def perplexity(fwd, params, cfg, batches) -> float:
    """exp(mean NLL) over the loss-masked targets of ``batches``."""
    run = jax.jit(lambda p, b: fwd(p, cfg, b["inputs"], positions=b["positions"],
                                   segment_ids=b["segment_ids"]).logits)
    tot = [_nll(run(params, {k: jnp.asarray(v) for k, v in b.items()}), b) for b in batches]
    return math.exp(sum(s for s, _ in tot) / sum(n for _, n in tot))


def main(argv: list[str]) -> int:
    del argv
    f = flags.FLAGS
    try:
        cfg, params = load_trained_model(f.checkpoint)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = str(get_or_build_default_tokenizer(f.cache_dir, cfg.vocab_size))
    corpus = build_default_corpus(f.cache_dir)
    calib = eval_batches(Source(str(corpus / "train.jsonl")), tok, f.seq_len, f.calib_rows, 1)
    held = eval_batches(Source(str(corpus / "valid.jsonl")), tok, f.seq_len, 8,
                        max(1, f.eval_rows // 8))
    results = {"fp32": {"ppl": perplexity(forward, params, cfg, held)}}
    for method in ("rtn", "gptq", "pgptq"):
        t0 = time.perf_counter()
        q = quantize_params(cfg, params, method, bits=f.bits, group_size=f.group_size,
                            calibration=None if method == "rtn" else calib)
        secs = time.perf_counter() - t0
        results[method] = {"ppl": perplexity(qforward, q, cfg, held), "quantize_s": round(secs, 2)}
        print(f"{method}: ppl {results[method]['ppl']:.4f} (quantized in {secs:.1f}s)")
    plain = ternary.TernaryConfig(group_size=f.ternary_group)
    plain.validate(cfg, "--ternary_group")
    rows = {"ternary": (plain, params)}
    if f.ternary_qat:
        qat_cfg, qat_params = load_trained_model(f.ternary_qat)
        if qat_cfg != cfg:
            print(f"error: {f.ternary_qat} is not a run of this model", file=sys.stderr)
            return 1
        rows["ternary_qat"] = (ternary.ternary_config_of_run(f.ternary_qat), qat_params)
    for name, (tc, weights) in rows.items():
        results[name] = {"ppl": perplexity(qforward, ternary.pack_params(weights, tc), cfg, held),
                         "group_size": tc.group_size}
        print(f"{name}: ppl {results[name]['ppl']:.4f}")
    report = {"checkpoint": f.checkpoint, "bits": f.bits, "group_size": f.group_size,
              "seq_len": f.seq_len, "calib_rows": f.calib_rows,
              "eval_tokens": int(sum(np.sum(b["loss_mask"]) for b in held)),
              "device": f"{jax.default_backend()} ({platform.processor() or platform.machine()})",
              "results": results}
    out = write_json(f.out, report, indent=1)
    print(f"fp32 ppl {results['fp32']['ppl']:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    app.run(main)
