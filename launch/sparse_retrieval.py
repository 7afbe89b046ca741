"""Does InfLLM v2 sparse attention learn? A synthetic long-context key-value retrieval task.

Each row: ``n_pairs`` (key, value) pairs hidden in the first quarter (after the first block,
which sparse attention always keeps) of a context of filler
tokens, then ``key QUERY x16`` at the end; the model must output that key's value. The answer lies
hundreds of tokens back, so the sparse model only succeeds if stage 1 selects the block holding
the pair (its local window cannot reach it). The same tiny model is trained once sparse
(``dense_len=-1``: always sparse) and once dense with identical data, seeds and steps; both
accuracies go to ``bench/results/sparse_retrieval.json``.

    python launch/sparse_retrieval.py --steps 600 --length 128
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_params, lm_head
from cpmjax.presets import tiny

N_QUERY = 16  # the row ends with `key QUERY*16`; the answer is the target at every QUERY
N_KEYS = 32  # key ids 3..34, value ids 35..66, filler 67..vocab-1, QUERY = 0
QUERY, KEY0, VAL0, FILL0 = 0, 3, 3 + N_KEYS, 3 + 2 * N_KEYS
VOCAB = 128
# HF forces init_blocks + local_blocks + 1 blocks (spec §2.1), so topk - init_blocks - 1 = 1
# block per query is chosen by stage 1: 4 of 8 blocks (64 of 128 keys) visible per query.
SPARSE = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=16,
              topk=3, use_nope=False, dense_len=-1)


def model_config(length: int, sparse: bool) -> ModelConfig:
    """The project's tiny preset, shrunk to 2 layers and a 128-token vocabulary."""
    d = {**tiny(), "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 192,
         "num_hidden_layers": 2, "dim_model_base": 32, "max_position_embeddings": length,
         "sparse_config": dict(SPARSE) if sparse else None}
    d.pop("rope_scaling", None)
    return ModelConfig.from_hf_config(d)


def make_batch(rng: np.random.Generator, batch: int, length: int,
               n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of filler with ``n_pairs`` distinct key-value pairs early on; ``(tokens, answers)``."""
    tokens = rng.integers(FILL0, VOCAB, size=(batch, length))
    answers = np.empty(batch, np.int64)
    for r in range(batch):
        keys = rng.choice(N_KEYS, n_pairs, replace=False)
        vals = rng.integers(0, N_KEYS, n_pairs)
        # after the always-kept init block (16 tokens), within the first quarter
        slots = 16 + rng.choice((length // 4 - 16) // 2, n_pairs, replace=False) * 2
        tokens[r, slots], tokens[r, slots + 1] = KEY0 + keys, VAL0 + vals
        j = rng.integers(n_pairs)
        tokens[r, -N_QUERY - 1], tokens[r, -N_QUERY:] = KEY0 + keys[j], QUERY
        answers[r] = VAL0 + vals[j]
    return tokens, answers


def train_one(sparse: bool, *, length: int, steps: int, batch: int, n_pairs: int, lr: float,
              seed: int, eval_rows: int) -> dict[str, Any]:
    """Train with AdamW on the answer at the QUERY positions (all >= N_QUERY tokens past the
    local window's reach of the pair); accuracy of the last position on ``eval_rows`` held-out rows."""
    cfg = model_config(length, sparse)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps, lr / 10), weight_decay=0.0))
    state = opt.init(params)

    def answer_logits(p, tok):
        h = forward(p, cfg, tok, return_logits=False).hidden[:, -N_QUERY:]
        return lm_head(p, cfg, h)  # [B, N_QUERY, V]

    def loss_fn(p, tok, ans):
        logits = answer_logits(p, tok)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ans[:, None]).mean()

    @jax.jit
    def step(p, s, tok, ans):
        loss, g = jax.value_and_grad(loss_fn)(p, tok, ans)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    predict = jax.jit(lambda p, tok: answer_logits(p, tok)[:, -1].argmax(-1))
    rng = np.random.default_rng(seed)
    t0, losses = time.time(), []
    for i in range(steps):
        tok, ans = make_batch(rng, batch, length, n_pairs)
        params, state, loss = step(params, state, jnp.asarray(tok), jnp.asarray(ans))
        if i % 25 == 0 or i == steps - 1:
            losses.append((i, round(float(loss), 4)))
            print(f"{'sparse' if sparse else 'dense'} step {i} loss {float(loss):.4f}", flush=True)
    train_s = time.time() - t0
    erng = np.random.default_rng(10_000 + seed)  # same held-out rows for both runs
    correct = 0
    for _ in range(eval_rows // batch):
        tok, ans = make_batch(erng, batch, length, n_pairs)
        correct += int((np.asarray(predict(params, jnp.asarray(tok))) == ans).sum())
    return {"accuracy": correct / (eval_rows // batch * batch), "train_seconds": round(train_s, 1),
            "loss_curve": losses}


def run(length: int = 128, steps: int = 600, batch: int = 8, n_pairs: int = 1,
        lr: float = 5e-3, seed: int = 0, eval_rows: int = 256,
        out: str | None = "bench/results/sparse_retrieval.json") -> dict[str, Any]:
    """Train sparse and dense; write and return the comparison."""
    kw = dict(length=length, steps=steps, batch=batch, n_pairs=n_pairs, lr=lr, seed=seed,
              eval_rows=eval_rows)
    sparse, dense = train_one(True, **kw), train_one(False, **kw)
    result = {"task": "key-value retrieval: pairs in the first quarter, query at the end",
              "settings": {**kw, "vocab": VOCAB, "model": "tiny preset, 2 layers, d=64, 4 heads / 2 KV",
                           "sparse_config": SPARSE,
                           "visible_tokens_per_query": (SPARSE["topk"] + SPARSE["window_size"]
                                                        // SPARSE["block_size"]) * SPARSE["block_size"]},
              "device": f"{jax.default_backend()} ({os.cpu_count()} cores, shared)",
              "sparse": sparse, "dense": dense,
              "sparse_over_dense": round(sparse["accuracy"] / max(dense["accuracy"], 1e-9), 4)}
    if out:
        _write_atomic(out, result)
    return result


def _write_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


FLAGS = flags.FLAGS
flags.DEFINE_integer("length", 128, "context length")
flags.DEFINE_integer("steps", 600, "training steps per run")
flags.DEFINE_integer("batch", 8, "rows per step")
flags.DEFINE_integer("n_pairs", 1, "key-value pairs per row")
flags.DEFINE_float("lr", 5e-3, "peak learning rate")
flags.DEFINE_string("out", "bench/results/sparse_retrieval.json", "result JSON")


def main(argv: list[str]) -> None:
    del argv
    res = run(FLAGS.length, FLAGS.steps, FLAGS.batch, FLAGS.n_pairs, FLAGS.lr, out=FLAGS.out)
    print(json.dumps({k: res[k] for k in ("sparse_over_dense",)}),
          res["sparse"]["accuracy"], res["dense"]["accuracy"])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
