"""muP coordinate check: ``python launch/mup_check.py --out=bench/results/mup_check``.

Trains a few Adam steps at widths 64..1024 (head_dim fixed, heads grow with width,
dim_model_base fixed) under muP and under the standard parametrization (SP) and records the RMS of
every activation "coordinate" (embedding output, each block's residual-stream output, logits)
after each step. Under muP these stay flat in width; under SP they grow. Method from Tensor
Programs V (Yang et al. 2022, arXiv:2203.03466, §D.1 "coordinate check"); the muP rules are
MiniCPM's (``cpmjax.train.optimizer`` docstring).

SP here means: ``init_params(parametrization="standard")``, one learning rate for every group,
``scale_emb = 1`` and ``dim_model_base = hidden_size`` (so no 1/m logit division).

Writes ``<out>.json`` (numbers and log-log slopes vs width) and ``<out>.png`` (one panel per
parametrization).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cpmjax.atomic import atomic_file, write_json
from cpmjax.config import ModelConfig
from cpmjax.model import forward
from cpmjax.model.transformer import embed_tokens
from cpmjax.presets import tiny
from cpmjax.train.experiment import experiment_config
from cpmjax.train.optimizer import make_optimizer
from cpmjax.train.step import init_state, make_train_step

_OUT = flags.DEFINE_string("out", "bench/results/mup_check", "output path without extension")
_WIDTHS = flags.DEFINE_list("widths", ["64", "128", "256", "512", "1024"], "hidden sizes")
_STEPS = flags.DEFINE_integer("steps", 8, "Adam steps")
_LR = flags.DEFINE_float("lr", 1e-2, "base learning rate (both parametrizations)")

HEAD_DIM = 32
BASE_WIDTH = 64
VOCAB = 256


def model_config(width: int, parametrization: str, layers: int = 2) -> ModelConfig:
    """A small MiniCPM-shaped config; SP switches off the muP forward-pass multipliers."""
    d = {**tiny(), "vocab_size": VOCAB, "hidden_size": width, "intermediate_size": 3 * width,
         "num_hidden_layers": layers, "num_attention_heads": width // HEAD_DIM,
         "num_key_value_heads": width // HEAD_DIM, "dim_model_base": BASE_WIDTH,
         "tie_word_embeddings": False, "max_position_embeddings": 64}
    if parametrization == "standard":
        d.update(scale_emb=1.0, dim_model_base=width)
    return ModelConfig.from_hf_config(d)


def fixed_batch(batch: int = 4, seq: int = 32, seed: int = 0) -> dict[str, jax.Array]:
    """A deterministic synthetic token batch (the same at every width)."""
    toks = jax.random.randint(jax.random.PRNGKey(seed), (batch, seq + 1), 0, VOCAB)
    ones = jnp.ones((batch, seq), jnp.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": ones.astype(jnp.float32),
            "segment_ids": ones, "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq))}


def activation_rms(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array]) -> dict[str, float]:
    """RMS of the embedding output, each block's output (the model truncated after it), logits."""
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))
    out = {"embed": rms(embed_tokens(params, cfg, batch["inputs"]))}
    for k in range(1, cfg.num_hidden_layers + 1):
        sub = {**params, "layers": jax.tree.map(lambda a: a[:k], params["layers"])}
        sub_cfg = dataclasses.replace(cfg, num_hidden_layers=k)
        res = forward(sub, sub_cfg, batch["inputs"], positions=batch["positions"],
                      return_logits=k == cfg.num_hidden_layers)
        out[f"block{k}"] = rms(res.hidden)
    out["logits"] = rms(res.logits)
    return out


def run_width(width: int, parametrization: str, steps: int, lr: float) -> list[dict[str, float]]:
    """Activation RMS at init and after each of ``steps`` Adam steps (constant LR, no clipping or
    weight decay so the muP LR rule is the only width-dependent optimizer setting)."""
    cfg = model_config(width, parametrization)
    t = experiment_config({}, "mup_check").train
    t.update(parametrization=parametrization, lr=lr, schedule="constant", warmup_steps=0,
             clip_norm=0.0, weight_decay=0.0)
    tx = make_optimizer(t, cfg)
    state = init_state(cfg, tx, jax.random.PRNGKey(1), parametrization=parametrization)
    step = jax.jit(make_train_step(cfg, tx))
    batch = fixed_batch()
    record = [activation_rms(state["params"], cfg, batch)]
    for _ in range(steps):
        state, _ = step(state, batch)
        record.append(activation_rms(state["params"], cfg, batch))
    return record


def loglog_slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def coord_check(widths: list[int], steps: int, lr: float) -> dict[str, Any]:
    result: dict[str, Any] = {"widths": widths, "steps": steps, "lr": lr, "head_dim": HEAD_DIM,
                              "dim_model_base": BASE_WIDTH}
    for p in ("mup", "standard"):
        runs = {w: run_width(w, p, steps, lr) for w in widths}
        keys = list(runs[widths[0]][0])
        rms = {k: [[runs[w][s][k] for w in widths] for s in range(steps + 1)] for k in keys}
        result[p] = {"rms": rms, "slope_last": {k: loglog_slope(widths, rms[k][-1]) for k in keys}}
    return result


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = result["widths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, p in zip(axes, ("mup", "standard")):
        for i, (k, per_step) in enumerate(result[p]["rms"].items()):
            for s in (0, result["steps"]):
                ax.plot(widths, per_step[s], marker="o", color=f"C{i}",
                        linestyle="-" if s else ":", label=f"{k} step {s}")
        ax.set(xscale="log", yscale="log", xlabel="width (hidden_size)",
               title=f"{p}: activation RMS (dotted: init, solid: step {result['steps']})")
    axes[0].set_ylabel("RMS")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    widths = [int(w) for w in _WIDTHS.value]
    if len(widths) < 2 or any(w % HEAD_DIM or w < HEAD_DIM for w in widths):
        raise app.UsageError(f"--widths needs >= 2 multiples of {HEAD_DIM}, got {widths}")
    result = coord_check(widths, _STEPS.value, _LR.value)
    write_json(_OUT.value + ".json", result, indent=1)
    plot(result, _OUT.value + ".png")
    for p in ("mup", "standard"):
        slopes = ", ".join(f"{k} {v:+.2f}" for k, v in result[p]["slope_last"].items())
        print(f"{p:8s} log-log slope vs width at step {result['steps']}: {slopes}")


if __name__ == "__main__":
    app.run(main)
