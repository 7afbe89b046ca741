"""InfLLM v2 long-context retrieval experiment (issue #4): ``python launch/sparse_retrieval.py``.

Dense pre-training through a length curriculum, then the same weights with ``sparse_config`` on
through a second curriculum, compared on held-out rows; the task, recipe and flags are described
in ``cpmjax.eval.sparse_retrieval``.

    python launch/sparse_retrieval.py                       # the 4K recipe, ~40 min on 2 cores
    python launch/sparse_retrieval.py --length=1024 --dense_phases=128:250:8,1024:100:4
"""

from __future__ import annotations

import json

from absl import app, flags

from cpmjax.eval.sparse_retrieval import DEFAULT_PHASES, DEFAULT_SPARSE_PHASES, run

FLAGS = flags.FLAGS

flags.DEFINE_integer("length", 4096, "context length of the sparse phase and of every eval")
flags.DEFINE_string("dense_phases", DEFAULT_PHASES, "dense curriculum, "
                    "length:steps:batch[:keep],... (keep: first quarter + last tokens of each "
                    "row, original positions)")
flags.DEFINE_string("sparse_phases", DEFAULT_SPARSE_PHASES, "sparse curriculum from the "
                    "dense weights, length:steps:batch,...")
flags.DEFINE_integer("scratch_steps", 0, "sparse-from-scratch steps at length (0: skip)")
flags.DEFINE_integer("n_pairs", 1, "key-value pairs per row")
flags.DEFINE_float("lr", 5e-3, "peak LR of the first dense phase (and of sparse from scratch)")
flags.DEFINE_float("finetune_lr", 2e-3, "peak LR of the later dense phases and the sparse one")
flags.DEFINE_integer("topk", 8, "stage-1 blocks per query (config.json topk, window excluded)")
flags.DEFINE_integer("eval_rows", 128, "held-out rows")
flags.DEFINE_integer("seed", 0, "seed of the init, the training rows and the held-out rows")
flags.DEFINE_string("dense_dir", None, "keep/reuse the dense stage here (weights + result)")
flags.DEFINE_string("out", "bench/results/sparse_retrieval.json", "result JSON")


def main(argv: list[str]) -> None:
    del argv
    res = run(FLAGS.length, FLAGS.dense_phases, FLAGS.sparse_phases, FLAGS.scratch_steps,
              FLAGS.n_pairs, FLAGS.lr, FLAGS.finetune_lr, FLAGS.topk,
              seed=FLAGS.seed, eval_rows=FLAGS.eval_rows, dense_dir=FLAGS.dense_dir,
              out=FLAGS.out)
    print(json.dumps({k: res[k]["accuracy"] for k in
                      ("dense", "sparse_before_sparse_training", "sparse_warm_started")}),
          "warm/dense", res["warm_over_dense"])


if __name__ == "__main__":
    app.run(main)
