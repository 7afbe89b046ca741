"""InfLLM v2 attention vs the best dense attention on this machine (``python launch/bench.py
attention``).

``run_prefill()`` times forward and forward+backward at 4K-32K of
  sparse = `select_blocks` (chunked stage 1) + `sparse_attention(implementation="xla")`;
  dense  = the faster, at each length and metric, of
           ``jax.nn.dot_product_attention(is_causal=True)`` (XLA: the whole T x T score matrix)
           and ``kernels.attention`` "xla" (flash attention in XLA: O(T x chunk) memory, key
           blocks above the diagonal skipped). A candidate whose compiled footprint exceeds
           ``memory_limit_gib`` is not run (its planned GiB is recorded).
Each row records every candidate's time and compiled footprint (arguments + outputs +
temporaries, ``compiled.memory_analysis()``) and the sparse path's.

``run_decode()`` times one decode step of one layer's attention into a KV cache: the sparse
cached path (``cpmjax.model.attention.attend`` with InfLLM v2: stage 1 on the cached kernels,
stage 2 gathering only the selected blocks) against dense attention over the whole cache (the
same call without ``sparse_config``: the XLA flash path over the cache's key blocks).

Head shapes: MiniCPM4-8B has G = 16 query heads per KV head and D = 128; on a 2-core CPU one KV
head, G = 8, D = 32 (FLOP ratios do not depend on H or D). Block 64, kernels 32/16, topk 96,
local 32 blocks, init 1 (MiniCPM4's sparse_config). The 32K fwd+bwd rows take ~10 min each on
2 cores; run under the heavy-job lock.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from cpmjax.bench.common import append, best_seconds, compiled_gib, meta
from cpmjax.config import ModelConfig
from cpmjax.model.attention import attend
from cpmjax.sparse.cache import init_compressed, update_compressed
from kernels import attention as dense_op
from kernels.infllmv2 import select_blocks, sparse_attention

SPARSE = dict(kernel_size=32, kernel_stride=16, block_size=64, topk=96, init_blocks=1,
              local_blocks=32)


def sparse(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    idx = select_blocks(q, k, **SPARSE)
    return sparse_attention(q, k, v, idx, block_size=SPARSE["block_size"], implementation="xla")


def flash_xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return dense_op.dot_product_attention(q, k, v, q_pos=pos, kv_pos=pos, keys_are_queries=True,
                                          implementation="xla")


def jax_nn_xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


DENSE = {"kernels.attention xla (flash)": flash_xla,
         "jax.nn.dot_product_attention xla": jax_nn_xla}


def _fwd_bwd(fn: Callable) -> Callable:
    return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def _measure(fn: Callable, args: tuple[jax.Array, ...], limit_gib: float,
             repeats: int = 1) -> dict[str, Any]:
    """Compile; run when the compiled footprint fits ``limit_gib``."""
    compiled = jax.jit(fn).lower(*args).compile()
    gib = compiled_gib(compiled)
    if gib > limit_gib:
        return {"seconds": None, "compiled_gib": gib, "skipped": f"needs {gib} GiB"}
    return {"seconds": best_seconds(compiled, *args, repeats=repeats), "compiled_gib": gib}


def random_qkv(seed: int, batch: int, tq: int, tk: int, heads: int, kv_heads: int,
               head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (batch, tq, heads, head_dim), jnp.float32),
            *(jax.random.normal(x, (batch, tk, kv_heads, head_dim), jnp.float32) for x in ks[1:]))


def _attended(q: jax.Array, k: jax.Array, t: int) -> float:
    """Keys a query attends on average under the sparse selection."""
    idx = select_blocks(q, k, **SPARSE)
    bs = SPARSE["block_size"]
    key_pos = idx[..., None] * bs + jnp.arange(bs)
    visible = (idx[..., None] >= 0) & (key_pos <= jnp.arange(t)[:, None, None])
    return float(visible.sum()) / t


def run_prefill(lengths: tuple[int, ...] = (4096, 8192, 16384, 32768), heads_per_kv: int = 8,
                head_dim: int = 32, backward_up_to: int = 32768, forward: bool = True,
                memory_limit_gib: float = 6.0) -> list[dict[str, Any]]:
    """One row per (length, metric); fwd+bwd only up to ``backward_up_to``."""
    info = meta()
    records = []
    for t in lengths:
        q, k, v = random_qkv(t, 1, t, t, heads_per_kv, 1, head_dim)
        attended = _attended(q, k, t)
        n1 = (t - 32) // 16 + 1
        slots = min(SPARSE["topk"], -(-t // SPARSE["block_size"]))  # the gather reads every slot
        # per query & head multiply-adds: stage 1 (fine + coarse kernels) + stage 2 (QK, PV),
        # against causal flash attention (half the keys on average)
        sparse_flops = 2 * head_dim * (n1 * 1.25) + 4 * head_dim * slots * SPARSE["block_size"]
        dense_flops = 4 * head_dim * (t + 1) / 2
        cfg = dict(info, config=f"T{t}_G{heads_per_kv}_D{head_dim}_kv1_b64_topk96", seq_len=t,
                   heads_per_kv=heads_per_kv, head_dim=head_dim)
        rows = [dict(metric="attended_tokens_per_query", value=attended, baseline=(t + 1) / 2,
                     ratio=attended / ((t + 1) / 2), higher_is_better=False),
                dict(metric="flops_per_query_head", value=sparse_flops, baseline=dense_flops,
                     ratio=sparse_flops / dense_flops, higher_is_better=False)]
        metrics = ([("forward_s", lambda f: f)] if forward else []) + (
            [("forward_backward_s", _fwd_bwd)] if t <= backward_up_to else [])
        for metric, wrap in metrics:
            ours = _measure(wrap(sparse), (q, k, v), memory_limit_gib)
            cands = {name: _measure(wrap(fn), (q, k, v), memory_limit_gib)
                     for name, fn in DENSE.items()}
            ran = {n: c for n, c in cands.items() if c["seconds"] is not None}
            best = min(ran, key=lambda n: ran[n]["seconds"])
            rows.append(dict(metric=metric, value=ours["seconds"], baseline=ran[best]["seconds"],
                             ratio=ran[best]["seconds"] / ours["seconds"],
                             higher_is_better=False, ratio_is="speedup", dense_baseline=best,
                             sparse_compiled_gib=ours["compiled_gib"], dense_candidates=cands))
        for r in rows:
            rec = {**cfg, **r}
            records.append(rec)
            print(f"{t:>6} {r['metric']:<28} sparse {r['value']:>12.4g}  dense "
                  f"{r['baseline']:>12.4g}  ratio {r['ratio']:.3g}  "
                  f"{r.get('dense_baseline', '')}", flush=True)
            append([rec], "attention")
    return records


def _decode_config(heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    """A model config whose attention has the benchmark's heads and MiniCPM4's sparse_config."""
    sc = dict(kernel_size=SPARSE["kernel_size"], kernel_stride=SPARSE["kernel_stride"],
              block_size=SPARSE["block_size"], init_blocks=SPARSE["init_blocks"],
              window_size=SPARSE["local_blocks"] * SPARSE["block_size"],
              topk=SPARSE["topk"] - SPARSE["local_blocks"], use_nope=False, dense_len=-1)
    return ModelConfig.from_hf_config(dict(
        vocab_size=128, eos_token_id=2, hidden_size=heads * head_dim, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1 << 20, rope_theta=10000.0, sparse_config=sc))


def run_decode(cache_lens: tuple[int, ...] = (8192, 32768, 131072), batch: int = 1,
               heads_per_kv: int = 8, kv_heads: int = 2, head_dim: int = 64,
               repeats: int = 20) -> list[dict[str, Any]]:
    """One decode step of one layer's attention, each row at the end of a full cache."""
    cfg = _decode_config(heads_per_kv * kv_heads, kv_heads, head_dim)
    dense_cfg = cfg.replace(sparse_config=None)
    info = meta()
    records = []
    for s in cache_lens:
        q, k, v = random_qkv(s, batch, 1, s, heads_per_kv * kv_heads, kv_heads, head_dim)
        comp = update_compressed(init_compressed(cfg.sparse_config, batch, s, kv_heads, head_dim),
                                 k, jnp.broadcast_to(jnp.arange(s), (batch, s)), cfg.sparse_config)
        q_pos = jnp.full((batch, 1), s - 1)
        kv_pos = jnp.broadcast_to(jnp.arange(s), (batch, s))

        def step(q, k, v, comp, sparse: bool):
            return attend(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_seg=None, kv_seg=None,
                          cfg=cfg if sparse else dense_cfg, compressed=comp if sparse else None)

        args = (q, k, v, comp)
        cached = best_seconds(jax.jit(lambda *a: step(*a, True)).lower(*args).compile(), *args,
                              repeats=repeats)
        dense = best_seconds(jax.jit(lambda *a: step(*a, False)).lower(*args).compile(), *args,
                             repeats=repeats)
        rec = dict(info, seq_len=s,
                   config=f"decode_S{s}_B{batch}_G{heads_per_kv}_kv{kv_heads}_D{head_dim}"
                          "_b64_topk96",
                   metric="decode_attention_step_s", value=cached, baseline=dense,
                   ratio=dense / cached, higher_is_better=False, ratio_is="speedup",
                   dense_baseline="kernels.attention xla (flash) over the whole cache")
        records.append(rec)
        print(f"{s:>7} decode step  sparse {cached * 1e3:9.3f} ms  dense {dense * 1e3:9.3f} ms"
              f"  speedup {dense / cached:.3g}", flush=True)
        append([rec], "attention")
    return records


def run() -> list[dict[str, Any]]:
    """Both tables."""
    return run_prefill() + run_decode()
