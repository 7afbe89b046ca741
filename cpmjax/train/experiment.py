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
    # none | full | dots | dots_no_batch. full (recompute each layer in the backward pass) is
    # what long rows need, and on CPU it is also the faster: storing every layer's activations
    # costs more than recomputing them (README "Benchmarks")
    t.remat = "full"
    t.on_nonfinite = "skip"  # skip | stop
    t.mtp_weight = 0.0  # lambda of the multi-token-prediction loss (MiniCPM4 report §2.3.2); 0 = no MTP head
    # a trained target (run dir or HF folder): train only the MTP/EAGLE draft head on top of it,
    # frozen (CPM.cu EAGLE draft); needs mtp_weight > 0 and the target's model config
    t.freeze_target = ""
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

    # attention kernels by name (cpmjax.model.attention; "auto" = the platform default):
    # dense: auto | xla | splash | splash_interpret | cudnn | reference (kernels/attention)
    # sparse (InfLLM v2 stage 2): auto | xla | pallas_tpu | pallas_gpu | ... (kernels/infllmv2)
    cfg.kernels = k = ml_collections.ConfigDict()
    k.attention_impl = "auto"
    k.sparse_attention_impl = "auto"

    cfg.mesh = m = ml_collections.ConfigDict()
    m.data, m.fsdp, m.tensor = 1, -1, 1

    cfg.checkpoint = c = ml_collections.ConfigDict()
    c.every = 200
    c.keep = 3
    c.async_save = True
    return cfg


def kernel_names(cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """``{"attn_impl", "sparse_impl"}`` from the config's ``kernels`` section (``"auto"`` for
    configs written before it existed), validated by name."""
    from cpmjax.model.attention import CONFIG_FIELDS, check_kernel_names

    k = cfg.get("kernels") or {}
    names = {"attn_impl": k.get("attention_impl", "auto"),
             "sparse_impl": k.get("sparse_attention_impl", "auto")}
    check_kernel_names(names["attn_impl"], names["sparse_impl"], CONFIG_FIELDS)
    return names
