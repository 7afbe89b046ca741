"""Does InfLLM v2 sparse attention learn? A synthetic long-context key-value retrieval task.

Each row: ``n_pairs`` (key, value) pairs hidden in the first quarter (after the first block,
which sparse attention always keeps) of a context of filler tokens, then ``key QUERY x16`` at
the end; the model must output that key's value. The answer lies thousands of tokens back at
4K, so the sparse model only succeeds if stage 1 selects the block holding the pair (its local
window cannot reach it).

Recipe (default, as MiniCPM4 trains InfLLM v2: sparse attention is switched on in the
long-context stage, on top of dense pre-training; MiniCPM4 report, arXiv 2506.07900 §5):

1. dense, a length curriculum ``--dense_phases`` (``length:steps:batch[:keep]`` each; short
   lengths are cheap, attention costs T^2). From scratch at 512 tokens the dense model stayed
   at chance for 400 steps, at 128 it learns in ~150, so the curriculum starts short. Trained
   up to 1024 it is at chance at 4096 and 30 steps of 2 rows at 4096 (~18 s each) did not move
   it, so the 4K distances are first learned on rows cut to ``keep`` tokens (the first quarter,
   which holds the pair, and the row's end, at their original positions: `keep_ends`), then a
   few steps run on whole 4K rows;
2. the same weights with ``sparse_config`` on, again through a length curriculum,
   ``--sparse_phases``. Switched on directly at 4096 (60 steps) the model reached 26%: the dense
   model's retrieval head puts all its weight on the value by pushing every filler logit ~30
   below it rather than raising the value's, so after mean-pooling over a kernel of 8 the
   value's kernel gains only ~4 while pooled filler scores vary by ~6 over 4K positions, and
   stage 1 keeps the pair's block for 2-8% of rows (chance is 8 of 256 blocks); with the
   softmax saturated there is no gradient to sharpen it either. At 1024 the pair's block is one
   of 64 and stage 1 keeps it often enough for sparse training to work; 2048 then 4096 follow.

Evaluated on the same held-out rows at ``--length``: the dense model, the dense weights run
with sparse attention before any sparse training, and the sparse-trained model. With
``--scratch_steps`` > 0 a sparse model is also trained from scratch at ``--length`` for that
many steps (stage 1 is discrete and gets no gradient of its own, so it has to discover the
pair by chance). For each sparse evaluation the fraction of held-out rows is recorded whose
question (``key QUERY*16``) has stage 1 select, in any of its positions, the pair's block, and
the pair's block or the next one (whose tokens see the pair in their local window, so layer 0
can copy it there for layer 1 to find), per layer and KV head.

    python launch/sparse_retrieval.py                       # the 4K recipe, ~40 min on 2 cores
    python launch/sparse_retrieval.py --length=1024 --dense_phases=128:250:8,1024:100:4

(the launcher parses flags and calls :func:`run`).

Flags: ``--length`` the sparse and eval length; ``--dense_phases``; ``--sparse_phases``;
``--scratch_steps``; ``--lr`` the peak LR of the first dense phase and of
sparse from scratch, ``--finetune_lr`` of every later phase; ``--topk`` stage-1 blocks
(config.json's ``topk``, window excluded); ``--eval_rows`` held-out rows; ``--n_pairs``; ``--seed``;
``--dense_dir`` keeps the dense stage (weights and result) and reuses it on the next run.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpmjax.atomic import write_json
from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_params, lm_head
from cpmjax.model.params import Params
from cpmjax.model.rope import apply_rope, rope_cos_sin
from cpmjax.model.transformer import decoder_layer, embed_tokens
from cpmjax.presets import tiny
from cpmjax.train.checkpoint import load_model, save_model
from kernels import infllmv2

N_QUERY = 16  # the row ends with `key QUERY*16`; the answer is the target at every QUERY
N_KEYS = 32  # key ids 3..34, value ids 35..66, filler 67..vocab-1, QUERY = 0
QUERY, KEY0, VAL0, FILL0 = 0, 3, 3 + N_KEYS, 3 + 2 * N_KEYS
VOCAB = 128
# MiniCPM4's layout (the MiniCPM4 README's sparse_config) at a small scale: block 16, kernels
# 8/4, one init block, a one-block window; HF forces init + window + current block, stage 1
# picks topk - 2 freely.
SPARSE = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=16,
              use_nope=False, dense_len=-1)


def model_config(max_length: int, topk: int | None) -> ModelConfig:
    """The project's tiny preset shrunk to 2 layers, d=64, a 128-token vocabulary; sparse
    (always, ``dense_len=-1``) with ``topk`` blocks, dense when ``topk`` is None."""
    d = {**tiny(), "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 192,
         "num_hidden_layers": 2, "dim_model_base": 32, "max_position_embeddings": max_length,
         "sparse_config": None if topk is None else {**SPARSE, "topk": topk}}
    d.pop("rope_scaling", None)
    return ModelConfig.from_hf_config(d)


def make_batch(rng: np.random.Generator, batch: int, length: int,
               n_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of filler with ``n_pairs`` distinct key-value pairs early on;
    ``(tokens, answers, answer_slots)`` (the position of the queried pair's key)."""
    if length < 4 * (16 + 2 * n_pairs) or length < 64:
        raise ValueError(f"length {length} is too short for {n_pairs} pairs after the first "
                         f"16-token block within the first quarter")
    tokens = rng.integers(FILL0, VOCAB, size=(batch, length))
    answers = np.empty(batch, np.int64)
    where = np.empty(batch, np.int64)
    for r in range(batch):
        keys = rng.choice(N_KEYS, n_pairs, replace=False)
        vals = rng.integers(0, N_KEYS, n_pairs)
        # after the always-kept init block (16 tokens), within the first quarter
        slots = 16 + rng.choice((length // 4 - 16) // 2, n_pairs, replace=False) * 2
        tokens[r, slots], tokens[r, slots + 1] = KEY0 + keys, VAL0 + vals
        j = rng.integers(n_pairs)
        tokens[r, -N_QUERY - 1], tokens[r, -N_QUERY:] = KEY0 + keys[j], QUERY
        answers[r], where[r] = VAL0 + vals[j], slots[j]
    return tokens, answers, where


def keep_ends(tokens: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The first quarter and the last ``keep - length//4`` tokens of each row with their
    original positions, ``(tokens, positions)``: the row's pair-to-query distances at a fraction
    of the attention cost (position skipping, as PoSE, Zhu et al. 2023, arXiv:2309.10400)."""
    length = tokens.shape[1]
    if not length // 4 + N_QUERY + 1 <= keep <= length:
        raise ValueError(f"keep {keep} must be in [{length // 4 + N_QUERY + 1}, {length}] "
                         f"(the first quarter plus the query) for length {length}")
    idx = np.concatenate([np.arange(length // 4), np.arange(length - keep + length // 4, length)])
    return tokens[:, idx], np.broadcast_to(idx, tokens.shape[:1] + idx.shape)


def answer_logits(params: Params, cfg: ModelConfig, tokens: jax.Array,
                  positions: jax.Array | None = None) -> jax.Array:
    """Logits at the QUERY positions, ``[B, N_QUERY, V]``."""
    h = forward(params, cfg, tokens, positions=positions, return_logits=False).hidden
    return lm_head(params, cfg, h[:, -N_QUERY:])


def train(params: Params, cfg: ModelConfig, *, steps: int, batch: int, length: int,
          n_pairs: int, lr: float, rng: np.random.Generator, name: str, keep: int | None = None
          ) -> tuple[Params, dict[str, Any]]:
    """AdamW (warmup + cosine, fresh state) on the answer at the QUERY positions, all >= N_QUERY
    tokens past the local window's reach of the pair. ``keep`` < ``length``: rows cut by
    `keep_ends` (dense only: the sparse fast path assumes positions 0..T-1)."""
    if steps < 1:
        raise ValueError(f"{name}: steps must be at least 1, got {steps}")
    keep = length if keep is None else keep
    if keep < length and cfg.sparse_config is not None:
        raise ValueError("keep < length (position skipping) is for dense phases only")
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps, lr / 10),
        weight_decay=0.0))
    state = opt.init(params)

    def loss_fn(p: Params, tok: jax.Array, pos: jax.Array, ans: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(
            answer_logits(p, cfg, tok, pos), ans[:, None]).mean()

    @jax.jit
    def step(p: Params, s: Any, tok: jax.Array, pos: jax.Array, ans: jax.Array
             ) -> tuple[Params, Any, jax.Array]:
        loss, g = jax.value_and_grad(loss_fn)(p, tok, pos, ans)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    t0, losses, every = time.time(), [], max(steps // 20, 1)
    for i in range(steps):
        tok, ans, _ = make_batch(rng, batch, length, n_pairs)
        tok, pos = keep_ends(tok, keep)
        params, state, loss = step(params, state, jnp.asarray(tok), jnp.asarray(pos, np.int32),
                                   jnp.asarray(ans))
        if i % every == 0 or i == steps - 1:
            losses.append((i, round(float(loss), 4)))
            print(f"{name} step {i} loss {float(loss):.4f} ({time.time() - t0:.0f}s)", flush=True)
    return params, {"steps": steps, "batch": batch, "length": length, "kept": keep, "lr": lr,
                    "seconds": round(time.time() - t0, 1), "loss_curve": losses}


def layer_selections(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Blocks stage 1 selects for the row's question (``key QUERY*16``, its last 17 positions)
    in every layer, ``[L, B, KV, 17, topk]``.

    Runs the layers one by one to reach each layer's rotated q and k (the forward pass does not
    return them). Every layer and question position is reported: the pair can reach the answer
    through any of them (e.g. the queried key's position reads the pair in layer 0 and the last
    QUERY reads that position, inside its local window, in layer 1).
    """
    sc = cfg.sparse_config
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = rope_cos_sin(cfg, pos)
    h = embed_tokens(params, cfg, tokens)
    picked = []
    for i in range(cfg.num_hidden_layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        taps: dict[str, jax.Array] = {}
        h, _ = decoder_layer(h, layer, cfg, cos=cos, sin=sin, positions=pos, segment_ids=None,
                             cache_kv=None, taps=taps)
        x = taps["attn_in"]
        span = N_QUERY + 1
        q = apply_rope(jnp.einsum("btd,dhk->bthk", x[:, -span:], layer["wq"]), cos[:, -span:],
                       sin[:, -span:])
        k = apply_rope(jnp.einsum("btd,dhk->bthk", x, layer["wk"]), cos, sin)
        idx = infllmv2.select_blocks(q, k, kernel_size=sc.kernel_size,
                                     kernel_stride=sc.kernel_stride, block_size=sc.block_size,
                                     topk=sc.total_topk, init_blocks=sc.init_blocks,
                                     local_blocks=sc.local_blocks, cache_len=T - span)
        picked.append(idx)
    return jnp.stack(picked)


def evaluate(params: Params, cfg: ModelConfig, *, rows: int, batch: int, length: int,
             n_pairs: int, seed: int) -> dict[str, Any]:
    """Accuracy of the last QUERY position on held-out rows (the same rows for every call with
    one seed); for a sparse model also how often stage 1 selects the pair's block there."""
    if rows < batch:
        raise ValueError(f"eval_rows {rows} must be at least the eval batch {batch}")
    predict = jax.jit(lambda p, tok: answer_logits(p, cfg, tok)[:, -1].argmax(-1))
    select = jax.jit(lambda p, tok: layer_selections(p, cfg, tok))
    rng = np.random.default_rng(10_000 + seed)
    t0, correct, hits, n = time.time(), 0, 0, 0
    for _ in range(rows // batch):
        tok, ans, where = make_batch(rng, batch, length, n_pairs)
        correct += int((np.asarray(predict(params, jnp.asarray(tok))) == ans).sum())
        if cfg.sparse_config is not None:
            blocks = np.asarray(select(params, jnp.asarray(tok)))  # [L, B, KV, 17, topk]
            pair = (where // cfg.sparse_config.block_size)[None, :, None, None, None]
            found = [(blocks == pair).any((-1, -2)),  # [L, B, KV]
                     ((blocks == pair) | (blocks == pair + 1)).any((-1, -2))]
            hits = hits + np.stack(found).sum(2)  # [2, L, KV]
        n += batch
    out = {"accuracy": correct / n, "rows": n, "seconds": round(time.time() - t0, 1)}
    if cfg.sparse_config is not None:
        # [layer][KV head], for any position of the question: the pair's block; it or the next
        # block, whose tokens have the pair in their local window (a 2-layer route)
        out["question_selects"] = dict(zip(("pair_block", "pair_or_next_block"),
                                           np.round(hits / n, 4).tolist()))
    print(f"eval {out}", flush=True)
    return out


def reads_the_key(params: Params, cfg: ModelConfig, *, rows: int, batch: int, length: int,
                  n_pairs: int, seed: int) -> float:
    """Fraction of held-out rows whose answer changes when the row asks for a key it does not
    hold. A model that retrieves by key must change its answer; one that outputs "the value
    token of the row" (enough with one pair per row) does not, and then has no reason to attend
    to the pair, so stage 1 has nothing to rank."""
    predict = jax.jit(lambda p, tok: answer_logits(p, cfg, tok)[:, -1].argmax(-1))
    rng = np.random.default_rng(10_000 + seed)
    changed = n = 0
    for _ in range(rows // batch):
        tok, ans, _ = make_batch(rng, batch, length, n_pairs)
        for r in range(batch):
            held = set(tok[r, : length // 4].tolist())
            tok[r, -N_QUERY - 1] = next(KEY0 + i for i in range(N_KEYS) if KEY0 + i not in held)
        changed += int((np.asarray(predict(params, jnp.asarray(tok))) != ans).sum())
        n += batch
    print(f"answer changes when asked for an absent key: {changed}/{n}", flush=True)
    return changed / n


Phase = tuple[int, int, int, int]  # (length, steps, batch, kept tokens per row)
DEFAULT_PHASES = "128:250:8,512:150:8,1024:60:4,4096:150:4:1280,4096:20:2"
DEFAULT_SPARSE_PHASES = "1024:200:4,2048:300:4,4096:200:2"


def parse_phases(text: str, name: str = "dense_phases") -> list[Phase]:
    """``"128:250:8,4096:30:2:1280"`` -> ``[(128, 250, 8, 128), (4096, 30, 2, 1280)]``; the
    optional 4th field keeps that many tokens of each row (`keep_ends`). Errors name the flag
    ``name``."""
    phases = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) not in (3, 4) or not all(x.strip().isdigit() and int(x) > 0 for x in parts):
            raise ValueError(f"--{name} item {item!r} must be length:steps:batch[:keep], "
                             "positive integers")
        phases.append(tuple(int(x) for x in parts) + ((int(parts[0]),) if len(parts) == 3 else ()))
    return phases


DENSE_RESULT = "dense_result.json"


def save_dense(path: str, phases: str, n_pairs: int, cfg: ModelConfig, params: Params,
               result: dict[str, Any]) -> None:
    """The dense stage's weights (`save_model`) and result, tagged with its phases and rows."""
    save_model(cfg, params, os.path.join(path, "model"), overwrite=True)
    write_json(os.path.join(path, DENSE_RESULT),
               {"dense_phases": phases, "n_pairs": n_pairs, **result})


def load_dense(path: str, phases: str, n_pairs: int, cfg: ModelConfig
               ) -> tuple[Params, dict[str, Any]]:
    """What `save_dense` wrote; refuses a dense stage trained with other phases, rows or shapes."""
    with open(os.path.join(path, DENSE_RESULT)) as f:
        result = json.load(f)
    saved_cfg, params = load_model(os.path.join(path, "model"))
    if (result.pop("dense_phases") != phases or result.pop("n_pairs", None) != n_pairs
            or saved_cfg.to_hf_config() != cfg.to_hf_config()):
        raise ValueError(f"{path} holds a dense stage of other phases, another task or another "
                         "model; use another --dense_dir")
    print(f"dense stage loaded from {path}: accuracy {result['accuracy']}", flush=True)
    return params, {**result, "loaded_from": path}


def train_phases(params: Params, cfg: ModelConfig, phases: list[Phase], n_pairs: int,
                 lrs: list[float], rng: np.random.Generator, name: str
                 ) -> tuple[Params, list[dict[str, Any]]]:
    """`train` through a length curriculum, phase i at peak LR ``lrs[i]``."""
    logs = []
    for (plen, steps, batch, keep), lr in zip(phases, lrs):
        params, log = train(params, cfg, steps=steps, batch=batch, length=plen, n_pairs=n_pairs,
                            lr=lr, rng=rng, keep=keep,
                            name=f"{name}@{plen}" + (f"/{keep}" if keep < plen else ""))
        logs.append(log)
    return params, logs


def run(length: int = 4096, dense_phases: str = DEFAULT_PHASES,
        sparse_phases: str = DEFAULT_SPARSE_PHASES, scratch_steps: int = 0,
        n_pairs: int = 1, lr: float = 5e-3, finetune_lr: float = 2e-3, topk: int = 8,
        seed: int = 0, eval_rows: int = 128, dense_dir: str | None = None,
        out: str | None = "bench/results/sparse_retrieval.json") -> dict[str, Any]:
    """Dense curriculum, sparse continuation (and optionally sparse from scratch); write and
    return the comparison. ``dense_dir``: keep the dense stage there (weights and its result)
    and reuse it when it is already there, so sparse settings can be compared on one dense
    model without retraining it."""
    phases = parse_phases(dense_phases)
    sphases = parse_phases(sparse_phases, "sparse_phases")
    if any(keep < plen for plen, _, _, keep in sphases):  # refused now, not after the dense stage
        raise ValueError(f"--sparse_phases {sparse_phases!r}: keep < length (position skipping) "
                         "is for dense phases only")
    if max(p[0] for p in phases + sphases) > length:
        raise ValueError(f"phases {dense_phases!r} / {sparse_phases!r} go past length {length}")
    dense_cfg, sparse_cfg = model_config(length, None), model_config(length, topk)
    rng = np.random.default_rng(seed)
    ev: Callable[[Params, ModelConfig], dict[str, Any]] = lambda p, c: evaluate(
        p, c, rows=eval_rows, batch=4, length=length, n_pairs=n_pairs, seed=seed)
    t0 = time.time()
    if dense_dir and os.path.exists(os.path.join(dense_dir, DENSE_RESULT)):
        params, dense = load_dense(dense_dir, dense_phases, n_pairs, dense_cfg)
    else:
        params, logs = train_phases(init_params(dense_cfg, jax.random.PRNGKey(seed)), dense_cfg,
                                    phases, n_pairs, [lr] + [finetune_lr] * (len(phases) - 1), rng,
                                    "dense")
        dense = {"train": logs, **ev(params, dense_cfg)}
        if dense_dir:
            save_dense(dense_dir, dense_phases, n_pairs, dense_cfg, params, dense)
    dense["reads_the_key"] = reads_the_key(params, dense_cfg, rows=min(eval_rows, 32), batch=4,
                                           length=length, n_pairs=n_pairs, seed=seed)
    before = ev(params, sparse_cfg)
    params, logs = train_phases(params, sparse_cfg, sphases, n_pairs, [finetune_lr] * len(sphases),
                                np.random.default_rng(seed + 1), "sparse")
    warm = {"train": logs, **ev(params, sparse_cfg)}
    result = {
        "task": "key-value retrieval: pairs in the first quarter after block 0, query at the end",
        "settings": {"length": length, "n_pairs": n_pairs, "seed": seed, "eval_rows": eval_rows,
                     "vocab": VOCAB, "lr": lr, "finetune_lr": finetune_lr,
                     "model": "tiny preset, 2 layers, d=64, 4 heads / 2 KV, head_dim 16",
                     "sparse_config": {**SPARSE, "topk": topk},
                     "visible_tokens_per_query": sparse_cfg.sparse_config.total_topk
                     * SPARSE["block_size"],
                     "recipe": f"dense phases {dense_phases}, then sparse_config on (same "
                               f"weights), sparse phases {sparse_phases} "
                               "(length:steps:batch[:kept])"},
        "device": f"{jax.default_backend()} ({os.cpu_count()} cores, shared)",
        "dense": dense, "sparse_before_sparse_training": before, "sparse_warm_started": warm,
        "warm_over_dense": round(warm["accuracy"] / max(dense["accuracy"], 1e-9), 4),
    }
    if scratch_steps:
        p0 = init_params(sparse_cfg, jax.random.PRNGKey(seed))
        p0, sc = train(p0, sparse_cfg, steps=scratch_steps, batch=sphases[-1][2], length=length,
                       n_pairs=n_pairs, lr=lr, rng=np.random.default_rng(seed), name="scratch")
        result["sparse_from_scratch"] = {"train": [sc], **ev(p0, sparse_cfg)}
    result["total_seconds"] = round(time.time() - t0, 1)
    if out:
        write_json(out, result, indent=1)
    return result
