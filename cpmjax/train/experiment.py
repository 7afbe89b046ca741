"""The experiment config: model + data + optimizer + mesh + checkpoint, as one ml_collections
ConfigDict that absl ``config_flags`` can override field by field (``--config.a.b=value``)."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def experiment_config(model: Mapping[str, Any], name: str) -> ml_collections.ConfigDict:
    """Base experiment around a model preset (an HF config.json dict)."""
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.model = ml_collections.ConfigDict(dict(model))

    cfg.train = t = ml_collections.ConfigDict()
    t.steps = 1000
    t.seq_len = 256
    t.global_batch_size = 16
    t.grad_accum = 1
    t.seed = 0
    t.parametrization = "mup"  # or "standard"
    t.lr = 1e-2  # base LR (muP: at width multiplier 1; hidden matrices get lr / m)
    t.schedule = "wsd"  # wsd | cosine | constant
    t.warmup_steps = 50
    t.decay_fraction = 0.2
    t.decay_shape = "exponential"  # exponential | linear | cosine | 1-sqrt
    t.final_lr_ratio = 0.1
    t.weight_decay = 0.1
    t.decay_embeddings = False
    t.b1, t.b2, t.eps = 0.9, 0.95, 1e-8
    t.clip_norm = 1.0
    t.compute_dtype = "float32"  # bfloat16 on accelerators; master weights stay float32
    t.remat = "none"  # none | full | dots | dots_no_batch
    t.on_nonfinite = "skip"  # skip | stop
    t.mtp_weight = 0.0  # lambda of the multi-token-prediction loss (MiniCPM4 report §2.3.2); 0 = no MTP head
    # a trained target (run dir or HF folder): train only the MTP/EAGLE draft head on top of it,
    # frozen (CPM.cu EAGLE draft); needs mtp_weight > 0 and the target's model config
    t.freeze_target = ""
    # a trained model (run dir, cpmjax checkpoint or HF folder) whose weights start a fresh run
    # (SFT, QAT); optimizer and LR schedule start afresh (warmup again); ignored on resume
    t.init_from = ""
    t.mtp_distill = False  # MTP labels = the model's own next-next-token distribution (drafts)
    t.log_every = 20
    t.eval_every = 200
    t.eval_batches = 8
    t.peak_flops = 0.0  # per device; 0 = from the device kind (none on CPU)

    cfg.data = d = ml_collections.ConfigDict()
    d.cache_dir = ".cache/cpmjax"  # default corpus and tokenizer are built here once
    d.train_files = ""  # comma-separated JSONL/text files; empty = the default corpus
    d.valid_file = ""
    d.source_type = "jsonl"
    d.weights = ""  # comma-separated mixture weights, one per train file
    d.tokenizer = ""  # folder with tokenizer.json; empty = the project's default tokenizer
    # text: documents, every token a target; chat: OpenAI/ShareGPT conversations (SFT), only the
    # assistant's tokens are targets, and empty train_files = the project's instruction set
    d.format = "text"
    d.long_conversations = "truncate"  # chat rows: a conversation over seq_len+1 tokens: or drop

    # BitCPM ternary quantization-aware training (cpmjax.quant.ternary; MiniCPM4 report §3.3)
    cfg.qat = q = ml_collections.ConfigDict()
    q.enabled = False
    q.group_size = 128  # input rows per absmean scale; -1 per output channel; 0 per tensor
    q.targets = "wq,wk,wv,wo,w_gate,w_up,w_down"  # may add embed, lm_head
    q.act_bits = 0  # 8: int8 per-token activations (BitNet b1.58); 0: compute dtype

    cfg.mesh = m = ml_collections.ConfigDict()
    m.data, m.fsdp, m.tensor = 1, -1, 1

    cfg.checkpoint = c = ml_collections.ConfigDict()
    c.every = 200
    c.keep = 3
    c.async_save = True
    return cfg
