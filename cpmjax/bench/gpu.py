"""The GPU rows (``python launch/bench.py gpu``, on a machine with a CUDA GPU).

- Attention at MiniCPM4-8B head shapes (32 query heads, 2 KV heads, head_dim 128, bf16,
  batch 1) at 32K, 64K and 128K: dense cuDNN flash attention (``kernels.attention`` "cudnn")
  against InfLLM v2 (``select_blocks`` + ``sparse_attention``, the Pallas GPU kernel and the XLA
  gather path), forward and forward+backward, with each compiled footprint.
- The 0.5B train step at 4096 tokens (bf16 compute, full remat): tokens/s and MFU.

Appends to ``bench/results/attention_gpu.jsonl`` and ``train_gpu.jsonl``. Never run by this
project (no GPU was available to it); the code paths it calls are tested on CPU where they
can be (the cuDNN binding only by a test marked ``gpu``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from cpmjax.bench.attention import SPARSE, random_qkv
from cpmjax.bench.common import append, best_seconds, compiled_gib, meta
from cpmjax.bench.train import cpmjax_step, time_side_by_side
from cpmjax.config import ModelConfig
from cpmjax.presets import minicpm4_0p5b
from cpmjax.train.metrics import device_peak_flops, flops_per_token
from kernels import attention as dense_op
from kernels.infllmv2 import select_blocks, sparse_attention


def _dense(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return dense_op.dot_product_attention(q, k, v, q_pos=pos, kv_pos=pos, keys_are_queries=True,
                                          implementation="cudnn")


def _sparse(implementation: str) -> Callable[..., jax.Array]:
    def fn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        idx = select_blocks(q, k, **SPARSE)
        return sparse_attention(q, k, v, idx, block_size=SPARSE["block_size"],
                                implementation=implementation)
    return fn


def _timed(fn: Callable, args: tuple[jax.Array, ...]) -> dict[str, Any]:
    compiled = jax.jit(fn).lower(*args).compile()
    return {"seconds": best_seconds(compiled, *args, repeats=3),
            "compiled_gib": compiled_gib(compiled)}


def run_attention(lengths: tuple[int, ...] = (32768, 65536, 131072)) -> list[dict[str, Any]]:
    info = meta()
    rows = []
    grad = lambda f: jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    for t in lengths:
        q, k, v = (x.astype(jnp.bfloat16) for x in random_qkv(t, 1, t, t, 32, 2, 128))
        for metric, wrap in (("forward_s", lambda f: f), ("forward_backward_s", grad)):
            dense = _timed(wrap(_dense), (q, k, v))
            for impl in ("pallas_gpu", "xla"):
                ours = _timed(wrap(_sparse(impl)), (q, k, v))
                rows.append({**info, "config": f"T{t}_H32_KV2_D128_bf16_b64_topk96",
                             "seq_len": t, "metric": metric, "sparse_impl": impl,
                             "value": ours["seconds"], "baseline": dense["seconds"],
                             "ratio": dense["seconds"] / ours["seconds"], "ratio_is": "speedup",
                             "dense_baseline": "kernels.attention cudnn",
                             "sparse_compiled_gib": ours["compiled_gib"],
                             "dense_compiled_gib": dense["compiled_gib"]})
                print(f"{t:>7} {metric:<20} {impl:<10} sparse {ours['seconds']:.4g} s  "
                      f"cudnn {dense['seconds']:.4g} s", flush=True)
    append(rows, "attention")
    return rows


def run_train_mfu(seq: int = 4096, batch: int = 8) -> list[dict[str, Any]]:
    cfg = ModelConfig.from_hf_config(minicpm4_0p5b())
    step = cpmjax_step("minicpm4_0p5b", batch, seq, dtype="bfloat16", remat="full")
    seconds = time_side_by_side({"cpmjax": step}, warmup=3, rounds=10)["cpmjax"]
    tokens_per_sec = batch * seq / seconds
    peak = device_peak_flops()
    mfu = tokens_per_sec * flops_per_token(cfg, seq) / (peak * jax.device_count()) if peak else None
    row = {**meta(), "config": "minicpm4_0p5b", "batch": batch, "seq_len": seq,
           "compute_dtype": "bfloat16", "remat": "full", "metric": "mfu", "value": mfu,
           "tokens_per_sec": tokens_per_sec, "step_time_s": seconds}
    print(f"0.5B train at {seq}: {tokens_per_sec:.0f} tok/s, MFU {mfu}", flush=True)
    append([row], "train")
    return [row]


def run() -> list[dict[str, Any]]:
    if jax.default_backend() != "gpu":
        raise SystemExit(f"the gpu suite needs a CUDA GPU; this machine's backend is "
                         f"{jax.default_backend()!r}")
    return run_attention() + run_train_mfu()
