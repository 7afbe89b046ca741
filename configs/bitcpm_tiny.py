"""BitCPM ternary quantization-aware training of the tiny model (MiniCPM4 report,
arXiv 2506.07900 §3.3), after the main job and SFT (``configs/tiny.py``, ``configs/sft_tiny.py``)::

    python launch/train.py --config=configs/bitcpm_tiny.py      # writes runs/bitcpm_tiny
    python launch/bitcpm_eval.py                                # bench/results/bitcpm_tiny.json
    python launch/export_ternary.py --checkpoint=runs/bitcpm_tiny \\
        --hf_out=runs/bitcpm_tiny/hf --packed_out=runs/bitcpm_tiny/packed

As BitCPM4 does, QAT starts from a trained full-precision model (here the SFT run, so the ternary
model can be judged on the instruction set; ``--config.train.init_from=runs/tiny
--config.data.format=text`` runs it on the pretraining corpus instead) with a fresh optimizer and
a re-warmed learning rate. Every decoder linear is ternary in the forward pass (absmean per group
of 128 input rows, straight-through gradients, ``cpmjax.quant.ternary``); embedding and head stay
in full precision. ``--config.qat.group_size=-1`` (per channel) or ``0`` (per tensor),
``--config.qat.targets=...,embed`` and ``--config.qat.act_bits=8`` change that.
"""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    cfg = experiment_config(presets.tiny(), name="bitcpm_tiny")
    t = cfg.train
    t.init_from = "runs/sft_tiny"
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 300, 30, 256, 16
    t.lr = 5e-3
    t.log_every, t.eval_every, t.eval_batches = 10, 100, 8
    cfg.checkpoint.every = 100
    cfg.data.format = "chat"
    cfg.qat.enabled = True
    cfg.qat.group_size = 128
    return cfg
