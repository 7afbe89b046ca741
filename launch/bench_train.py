"""Training-throughput benchmark: cpmjax vs HF transformers (PyTorch) side by side.

``python launch/bench.py train`` (or ``python launch/bench_train.py``) times the jitted cpmjax train
step and, in the same process on the same machine, ``transformers.LlamaForCausalLM`` with the same
shapes (MiniCPM's muP scalars aside, the same architecture), AdamW, batch and sequence length.
Results are appended as JSON lines to ``bench/results/train_<platform>.jsonl``; ``ratio`` is
cpmjax / baseline (for step_time lower is better, for tokens_per_sec higher).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpmjax import presets  # noqa: E402
from cpmjax.config import ModelConfig  # noqa: E402
from cpmjax.convert.hf_export import llama_config  # noqa: E402
from cpmjax.parallel import make_mesh  # noqa: E402
from cpmjax.train.experiment import experiment_config  # noqa: E402
from cpmjax.train.metrics import device_peak_flops, flops_per_token  # noqa: E402
from cpmjax.train.optimizer import make_optimizer  # noqa: E402
from cpmjax.train.step import (init_state, jit_train_step, make_train_step,  # noqa: E402
                               state_shardings)

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _time(step: Callable[[], Any], warmup: int, steps: int) -> float:
    """Median seconds per call after ``warmup`` calls (compilation, allocator warm-up)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _batch(cfg: ModelConfig, batch: int, seq: int) -> dict[str, np.ndarray]:
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "loss_mask": np.ones((batch, seq), np.float32)}


def time_cpmjax(name: str, batch: int, seq: int, warmup: int, steps: int,
                dtype: str = "float32") -> float:
    exp = experiment_config(getattr(presets, name)(), name)
    exp.train.compute_dtype = dtype
    cfg = ModelConfig.from_hf_config(exp.model.to_dict())
    tx = make_optimizer(exp.train, cfg)
    mesh = make_mesh()
    init = lambda k: init_state(cfg, tx, k)
    sh = state_shardings(cfg, jax.eval_shape(init, jax.random.key(0)), mesh)
    state = jax.jit(init, out_shardings=sh)(jax.random.key(0))
    step = jit_train_step(make_train_step(cfg, tx, dtype=jnp.dtype(dtype)), sh, mesh,
                          (batch, seq))
    data = {k: jnp.asarray(v) for k, v in _batch(cfg, batch, seq).items()}
    holder = [state]

    def one() -> None:
        holder[0], m = step(holder[0], data)
        jax.block_until_ready(m["loss"])

    return _time(one, warmup, steps)


def time_torch(name: str, batch: int, seq: int, warmup: int, steps: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig.from_hf_config(getattr(presets, name)())
    hf = {**llama_config(cfg, "float32"), "tie_word_embeddings": cfg.tie_word_embeddings}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = _batch(cfg, batch, seq)
    inputs = torch.from_numpy(data["inputs"]).long()
    targets = torch.from_numpy(data["targets"]).long()

    def one() -> None:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(one, warmup, steps)


def run(configs: tuple[str, ...] = ("tiny", "small"), batch: int = 8, seq: int = 256,
        warmup: int = 2, steps: int = 5, out: Path | None = None) -> list[dict]:
    """Measure both frameworks per config; print a table and append JSON lines."""
    import torch

    device = jax.devices()[0]
    device_name = f"{device.platform}:{device.device_kind} x{jax.device_count()} " \
                  f"({os.cpu_count()} cpu, torch threads {torch.get_num_threads()})"
    peak = device_peak_flops()
    rows = []
    for name in configs:
        cfg = ModelConfig.from_hf_config(getattr(presets, name)())
        jax_t = time_cpmjax(name, batch, seq, warmup, steps)
        torch_t = time_torch(name, batch, seq, warmup, steps)
        tokens = batch * seq
        common = {"device": device_name, "config": name, "batch": batch, "seq_len": seq,
                  "steps_timed": steps, "jax": jax.__version__, "torch": torch.__version__,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
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
    path = out or RESULTS / f"train_{device.platform}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    run()
