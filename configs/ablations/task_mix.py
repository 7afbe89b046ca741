"""Ablation: how much verifiable-task text is mixed into pre-training, and for how long.

    python launch/ablate.py --study=configs/ablations/task_mix.py

Models that span task accuracy for the ScalingBench-style fit (launch/indicator_fit.py): the
muP-transfer base model (2 layers, width 128) trained on the default corpus with a share of the
instruction set's train split as plain text (cpmjax.experiments.indicator.task_corpus, built on
first use) for 100 or 250 steps (and 90% for 500 and 1500). Held-out LM loss is the corpus's held-out
split in every run; after each run the indicator and greedy exact-match accuracy are computed on
64 held-out problems.
"""

from pathlib import Path

from cpmjax.data.corpus import build_default_corpus
from cpmjax.experiments.indicator import task_corpus
from cpmjax.experiments.study import config_from_file, study_config


def get_config():
    base = config_from_file(Path(__file__).resolve().parents[1] / "mup_transfer.py")
    base.name = "task_mix"
    base.model.update(hidden_size=128, intermediate_size=384, num_attention_heads=8,
                      num_key_value_heads=8, dim_model_base=32)
    base.train.lr = 0.03
    corpus = build_default_corpus(base.data.cache_dir)
    tasks_file = str(task_corpus(base.data.cache_dir))
    base.data.valid_file = str(corpus / "valid.jsonl")
    variants = {}
    settings = [(s, n) for s in (0.0, 0.1, 0.3, 0.6) for n in (100, 250)] + [(0.9, 500),
                                                                         (0.9, 1500)]
    for share, steps in settings:
        files = [str(corpus / "train.jsonl")] + ([tasks_file] if share else [])
        weights = [1 - share] + ([share] if share else [])
        variants[f"tasks{int(share * 100)}_steps{steps}"] = {
            "data": {"train_files": ",".join(files),
                     "weights": ",".join(f"{w:g}" for w in weights)},
            "train": {"steps": steps, "eval_every": steps, "warmup_steps": 10},
            "checkpoint": {"every": steps}}
    study = study_config(base, "task_mix", variants=variants, seeds=(0,))
    study.indicator.enabled, study.indicator.accuracy = True, True
    return study
