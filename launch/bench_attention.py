"""InfLLM v2 attention benchmark on this machine: sparse (XLA path) vs dense causal (XLA).

``run_prefill()`` times forward and forward+backward of
  sparse = `select_blocks` (chunked stage 1) + `sparse_attention(implementation="xla")`
  dense  = query-chunked softmax attention over all keys with a causal mask (what
           `jax.nn.dot_product_attention(is_causal=True)` computes through XLA, chunked over
           queries so 32K fits in memory; it does not skip masked-out key tiles),
prints a table and appends JSON lines to bench/results/attention_cpu.jsonl.

``run_decode()`` times one decode step of one layer's attention into a KV cache (what
`cpmjax.sparse.sparse_attend` runs per layer): the cached path (stage 1 on the cached kernels,
stage 2 gathering only the selected blocks) against the masked path decode used before
(selection + dense attention over the whole cache under the block mask).
Head shapes: MiniCPM4-8B has G = 16 query heads per KV head and D = 128; for a 2-core CPU we use
one KV head, G = 8, D = 32 (FLOP ratios do not depend on H or D). Fwd+bwd was once cut at 8K
for time, not memory: compiled temporaries of fwd+bwd at 32K are 0.41 GiB sparse and 1.54 GiB
dense (peak RSS 4.3 GB), but 32K fwd+bwd alone takes ~11 min on the shared 2-core CPU (dense
511 s), so the whole run takes ~30 min; `run_prefill(lengths=(32768,), backward_up_to=32768,
forward=False)` adds one length's fwd+bwd rows alone. Block 64, kernels 32/16,
topk 96, local 32 blocks, init 1 (MiniCPM4 sparse_config).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cpmjax.config import ModelConfig  # noqa: E402
from cpmjax.model.attention import attend  # noqa: E402
from cpmjax.sparse.cache import init_compressed, update_compressed  # noqa: E402
from kernels.infllmv2 import select_blocks, sparse_attention  # noqa: E402

SPARSE = dict(kernel_size=32, kernel_stride=16, block_size=64, topk=96, init_blocks=1,
              local_blocks=32)
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "bench", "results", "attention_cpu.jsonl")


def dense_causal(q: jax.Array, k: jax.Array, v: jax.Array, query_chunk: int = 512) -> jax.Array:
    """Causal softmax attention, query-chunked (full key range per chunk, masked)."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    n = t // query_chunk
    qc = q.reshape(b, n, query_chunk, kvh, g, d).transpose(1, 0, 2, 3, 4, 5)

    @jax.checkpoint
    def chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        qch, start = args
        s = jnp.einsum("bckgd,bskd->bkgcs", qch, k) / math.sqrt(d)
        mask = jnp.arange(t)[None, :] <= (start + jnp.arange(query_chunk))[:, None]
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        return jnp.einsum("bkgcs,bskd->bckgd", p, v)

    out = jax.lax.map(chunk, (qc, jnp.arange(n) * query_chunk))
    return out.transpose(1, 0, 2, 3, 4, 5).reshape(b, t, h, d)


def sparse(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    idx = select_blocks(q, k, **SPARSE)
    return sparse_attention(q, k, v, idx, block_size=SPARSE["block_size"], implementation="xla")


def _time(fn: Callable, *args: jax.Array, repeats: int = 1) -> float:
    """Seconds for one call of an AOT-compiled function (compile excluded; best of repeats)."""
    compiled = jax.jit(fn).lower(*args).compile()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _fwd_bwd(fn: Callable) -> Callable:
    return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def _meta() -> dict[str, Any]:
    """Device, jax version and UTC start time, recorded with every row of a run."""
    dev = jax.devices()[0]
    return dict(device=f"{dev.platform}:{dev.device_kind} x{jax.device_count()} "
                       f"({os.cpu_count()} cpu)", jax=jax.__version__,
                time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def _random_qkv(seed: int, batch: int, tq: int, tk: int, heads: int, kv_heads: int,
                head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (batch, tq, heads, head_dim), jnp.float32),
            *(jax.random.normal(x, (batch, tk, kv_heads, head_dim), jnp.float32) for x in ks[1:]))


def run() -> list[dict[str, Any]]:
    """Both tables (``python launch/bench.py attention``)."""
    return run_prefill() + run_decode()


def run_prefill(lengths: tuple[int, ...] = (4096, 8192, 16384, 32768), heads_per_kv: int = 8,
        head_dim: int = 32, backward_up_to: int = 32768, forward: bool = True,
        out_path: str = RESULTS) -> list[dict[str, Any]]:
    """Benchmark each length; fwd+bwd only for lengths <= backward_up_to; ``forward=False``
    skips the forward-only timing (to add fwd+bwd rows alone). Returns the records."""
    meta = _meta()
    records = []
    for t in lengths:
        q, k, v = _random_qkv(t, 1, t, t, heads_per_kv, 1, head_dim)
        idx = select_blocks(q, k, **SPARSE)
        bs = SPARSE["block_size"]
        # attended tokens: selected blocks, minus the causal tail of the current block
        key_pos = idx[..., None] * bs + jnp.arange(bs)
        visible = (idx[..., None] >= 0) & (key_pos <= jnp.arange(t)[:, None, None])
        attended = float(visible.sum()) / t
        dense_causal_keys = (t + 1) / 2
        n1 = (t - 32) // 16 + 1
        # per query & head multiply-adds: stage 1 (fine + coarse kernels) + stage 2 (QK, PV)
        slots = min(SPARSE["topk"], -(-t // bs))  # the gather path reads every slot
        sparse_flops = 2 * head_dim * (n1 * 1.25) + 4 * head_dim * slots * bs
        dense_flops = 4 * head_dim * t  # masked XLA dense computes every key
        cfg = dict(meta, load_avg_1m=os.getloadavg()[0],
                   config=f"T{t}_G{heads_per_kv}_D{head_dim}_kv1_b64_topk96", seq_len=t,
                   heads_per_kv=heads_per_kv, head_dim=head_dim,
                   dense_baseline="query-chunked masked causal softmax (XLA)")
        rows = [dict(metric="attended_tokens_per_query", value=attended, baseline=dense_causal_keys,
                     ratio=attended / dense_causal_keys, higher_is_better=False),
                dict(metric="flops_per_query_head", value=sparse_flops, baseline=dense_flops,
                     ratio=sparse_flops / dense_flops, higher_is_better=False)]
        if forward:
            fs, fd = _time(sparse, q, k, v), _time(dense_causal, q, k, v)
            rows.append(dict(metric="forward_s", value=fs, baseline=fd, ratio=fd / fs,
                             higher_is_better=False, ratio_is="speedup"))
        if t <= backward_up_to:
            bs_, bd = _time(_fwd_bwd(sparse), q, k, v), _time(_fwd_bwd(dense_causal), q, k, v)
            rows.append(dict(metric="forward_backward_s", value=bs_, baseline=bd, ratio=bd / bs_,
                             higher_is_better=False, ratio_is="speedup"))
        for r in rows:
            rec = {**cfg, **r}
            records.append(rec)
            print(f"{t:>6} {r['metric']:<28} sparse {r['value']:>12.4g}  dense {r['baseline']:>12.4g}"
                  f"  ratio {r['ratio']:.3g}", flush=True)
            _append(rec, out_path)
    return records


def _append(rec: dict[str, Any], out_path: str) -> None:
    with open(out_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _decode_config(heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    """A model config whose attention has the benchmark's heads and MiniCPM4's sparse_config."""
    sc = dict(kernel_size=SPARSE["kernel_size"], kernel_stride=SPARSE["kernel_stride"],
              block_size=SPARSE["block_size"], init_blocks=SPARSE["init_blocks"],
              window_size=SPARSE["local_blocks"] * SPARSE["block_size"],
              topk=SPARSE["topk"] - SPARSE["local_blocks"], use_nope=False, dense_len=-1)
    return ModelConfig.from_hf_config(dict(
        vocab_size=128, eos_token_id=2, hidden_size=heads * head_dim, intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1 << 20,
        rope_theta=10000.0, sparse_config=sc))


def run_decode(cache_lens: tuple[int, ...] = (8192, 32768, 131072), batch: int = 1,
               heads_per_kv: int = 8, kv_heads: int = 2, head_dim: int = 64, repeats: int = 20,
               out_path: str = RESULTS) -> list[dict[str, Any]]:
    """One decode step of one layer's attention, each row at the end of a full cache."""
    cfg = _decode_config(heads_per_kv * kv_heads, kv_heads, head_dim)
    meta = _meta()
    records = []
    for s in cache_lens:
        q, k, v = _random_qkv(s, batch, 1, s, heads_per_kv * kv_heads, kv_heads, head_dim)
        comp = update_compressed(init_compressed(cfg.sparse_config, batch, s, kv_heads, head_dim),
                                 k, jnp.broadcast_to(jnp.arange(s), (batch, s)), cfg.sparse_config)
        q_pos = jnp.full((batch, 1), s - 1)
        kv_pos = jnp.broadcast_to(jnp.arange(s), (batch, s))

        def step(q, k, v, comp, masked: bool):
            # one document id on both sides selects the packed-row (masked) path
            seg = (lambda x: jnp.zeros_like(x)) if masked else (lambda x: None)
            return attend(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_seg=seg(q_pos),
                          kv_seg=seg(kv_pos), cfg=cfg, compressed=comp)

        cached = _time(lambda *a: step(*a, False), q, k, v, comp, repeats=repeats)
        masked = _time(lambda *a: step(*a, True), q, k, v, comp, repeats=repeats)
        rec = dict(meta, seq_len=s,
                   load_avg_1m=os.getloadavg()[0],
                   config=f"decode_S{s}_B{batch}_G{heads_per_kv}_kv{kv_heads}_D{head_dim}_b64_topk96",
                   metric="decode_attention_step_s", value=cached, baseline=masked,
                   ratio=masked / cached, higher_is_better=False, ratio_is="speedup",
                   dense_baseline="masked path: selection + dense attention over the cache")
        records.append(rec)
        print(f"{s:>7} decode step  cached {cached * 1e3:9.3f} ms  masked {masked * 1e3:9.3f} ms"
              f"  speedup {masked / cached:.3g}", flush=True)
        _append(rec, out_path)
    return records


if __name__ == "__main__":
    run()
