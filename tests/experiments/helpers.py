"""Shared pieces of the experiments tests: a micro study on the project's tokenizer."""

from __future__ import annotations

from pathlib import Path

from cpmjax import presets
from cpmjax.experiments.study import study_config
from cpmjax.train.experiment import experiment_config

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "cpmjax"


def micro_model() -> dict:
    """The tiny preset at width 64, 2 layers (the default 4096-token tokenizer)."""
    return {**presets.tiny(), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "dim_model_base": 32}


def micro_study(name: str = "micro", steps: int = 4, variants: dict | None = None,
                seeds: tuple[int, ...] = (0,)):
    base = experiment_config(micro_model(), name=name)
    t = base.train
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = steps, 1, 32, 4
    t.log_every, t.eval_every, t.eval_batches = 1, 2, 1
    base.checkpoint.every = 2
    base.data.cache_dir = str(CACHE)
    return study_config(base, name, seeds=seeds,
                        variants=variants or {"wsd": {"train": {"schedule": "wsd"}}})
