"""Supervised fine-tuning of the tiny main-job model on the project's instruction set, in the
MiniCPM4 chat format, after the main job (``configs/tiny.py``, which writes ``runs/tiny``)::

    python launch/train.py --config=configs/sft_tiny.py      # writes runs/sft_tiny
    python launch/sft_eval.py                                # bench/results/sft_tiny.json

The run starts from the pretrained weights (``train.init_from``: a run dir, cpmjax checkpoint or
HF folder) with a fresh optimizer and a learning rate that warms up again (MiniCPM4 report,
arXiv 2506.07900 §3.1). Data: ``cpmjax.posttrain.tasks`` builds the instruction set in
``data.cache_dir`` on first use (train split; the held-out split gives ``eval_loss``, the
held-out assistant-token loss); only the assistant's tokens are targets. Another chat dataset:
``--config.data.train_files=a.jsonl --config.data.valid_file=b.jsonl`` (OpenAI messages or
ShareGPT JSONL).
"""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    cfg = experiment_config(presets.tiny(), name="sft_tiny")
    t = cfg.train
    t.init_from = "runs/tiny"
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 400, 20, 256, 16
    t.lr = 1e-2  # the pretraining peak (muP base LR); lower rates did not learn copying in time
    t.log_every, t.eval_every, t.eval_batches = 10, 100, 8
    cfg.checkpoint.every = 100
    cfg.data.format = "chat"
    return cfg
