"""Training throughput: cpmjax vs HF transformers (PyTorch) side by side (``python
launch/bench.py train``).

Times the jitted cpmjax train step and, in the same process on the same machine,
``transformers.LlamaForCausalLM`` with the same shapes (MiniCPM's muP scalars aside, the same
architecture), AdamW with gradient clipping, batch and sequence length. PyTorch runs with 1 and
with all intra-op threads and the baseline is the faster (on a shared 2-core machine its
spinning OpenMP threads can make 2 threads several times slower than 1). All sides are timed in
alternating rounds so that load from other jobs falls on each; each figure is a median step
time. ``ratio`` is cpmjax / baseline (step time: lower is better; tokens/s: higher). Rows go to
``bench/results/train_<platform>.jsonl``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax import presets
from cpmjax.bench.common import append, meta
from cpmjax.config import ModelConfig
from cpmjax.convert.hf_export import llama_config
from cpmjax.parallel import make_mesh
from cpmjax.train.experiment import experiment_config
from cpmjax.train.metrics import device_peak_flops, flops_per_token
from cpmjax.train.optimizer import make_optimizer
from cpmjax.train.step import init_state, jit_train_step, make_train_step, state_shardings


def batch_arrays(cfg: ModelConfig, batch: int, seq: int) -> dict[str, np.ndarray]:
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "loss_mask": np.ones((batch, seq), np.float32)}


def cpmjax_step(name: str, batch: int, seq: int, dtype: str = "float32",
                **step_kw: Any) -> Callable[[], None]:
    """One blocking cpmjax train step per call (state carried between calls), with the
    experiment config's defaults (remat among them) unless ``step_kw`` overrides them."""
    exp = experiment_config(getattr(presets, name)(), name)
    exp.train.compute_dtype = dtype
    cfg = ModelConfig.from_hf_config(exp.model.to_dict())
    tx = make_optimizer(exp.train, cfg)
    mesh = make_mesh()
    init = lambda k: init_state(cfg, tx, k)
    sh = state_shardings(cfg, jax.eval_shape(init, jax.random.key(0)), mesh)
    state = [jax.jit(init, out_shardings=sh)(jax.random.key(0))]
    step_kw = {"remat": exp.train.remat, **step_kw}  # as launch/train.py runs it by default
    step = jit_train_step(make_train_step(cfg, tx, dtype=jnp.dtype(dtype), **step_kw), sh, mesh,
                          (batch, seq))
    data = {k: jnp.asarray(v) for k, v in batch_arrays(cfg, batch, seq).items()}

    def one() -> None:
        state[0], m = step(state[0], data)
        jax.block_until_ready(m["loss"])

    return one


def torch_step(name: str, batch: int, seq: int, threads: int | None = None
               ) -> Callable[[], None]:
    """One PyTorch (HF Llama) train step per call: forward, CE, backward, clip, AdamW; with
    ``threads`` intra-op threads (set at each call, so several settings can alternate)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig.from_hf_config(getattr(presets, name)())
    hf = {**llama_config(cfg, "float32"), "tie_word_embeddings": cfg.tie_word_embeddings}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = batch_arrays(cfg, batch, seq)
    inputs = torch.from_numpy(data["inputs"]).long()
    targets = torch.from_numpy(data["targets"]).long()

    default_threads = torch.get_num_threads()

    def one() -> None:
        torch.set_num_threads(threads or default_threads)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def time_side_by_side(steps: dict[str, Callable[[], None]], warmup: int, rounds: int
                      ) -> dict[str, float]:
    """Median seconds per step of each callable, timed in alternating rounds."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def run(configs: tuple[str, ...] = ("tiny", "small"), batch: int = 8, seq: int = 256,
        warmup: int = 3, rounds: int = 10) -> list[dict]:
    """Measure both frameworks per config; print a table and append JSON lines."""
    import torch

    info = meta()
    thread_counts = sorted({1, torch.get_num_threads()})
    peak = device_peak_flops()
    rows = []
    for name in configs:
        cfg = ModelConfig.from_hf_config(getattr(presets, name)())
        sides = {"cpmjax": cpmjax_step(name, batch, seq)}
        sides.update({f"torch_{n}_threads": torch_step(name, batch, seq, n)
                      for n in thread_counts})
        t = time_side_by_side(sides, warmup, rounds)
        best = min((k for k in t if k.startswith("torch")), key=t.get)
        jax_t, torch_t = t["cpmjax"], t[best]
        tokens = batch * seq
        common = {**info, "config": name, "batch": batch, "seq_len": seq, "rounds": rounds,
                  "torch": torch.__version__, "timing": "alternating rounds, median",
                  "baseline_is": best, "step_times_s": t}
        rows.append({**common, "metric": "step_time_s", "value": jax_t, "baseline": torch_t,
                     "ratio": jax_t / torch_t, "higher_is_better": False})
        rows.append({**common, "metric": "tokens_per_sec", "value": tokens / jax_t,
                     "baseline": tokens / torch_t, "ratio": torch_t / jax_t,
                     "higher_is_better": True})
        mfu = (tokens / jax_t * flops_per_token(cfg, seq) / (peak * jax.device_count())
               if peak else None)
        rows.append({**common, "metric": "mfu", "value": mfu, "baseline": None, "ratio": None,
                     "higher_is_better": True})
    print(f"{'config':8} {'metric':15} {'cpmjax':>12} {'torch':>12} {'ratio':>7}")
    for r in rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.4g}"
        print(f"{r['config']:8} {r['metric']:15} {fmt(r['value']):>12} {fmt(r['baseline']):>12} "
              f"{fmt(r['ratio']):>7}")
    append(rows, "train")
    return rows
