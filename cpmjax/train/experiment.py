"""The experiment config: model + data + optimizer + mesh + checkpoint, as one ml_collections
ConfigDict that absl ``config_flags`` can override field by field (``--config.a.b=value``), and
``check_experiment``, which validates all of it before anything is compiled or written."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import ml_collections

from cpmjax.config import ConfigError, ModelConfig
from cpmjax.model.mtp import DRAFT_FORMS
from cpmjax.posttrain.tasks import KNOWN_FAMILIES, parse_families


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
    # skip budget: stop (non-zero exit) once this many consecutive steps were skipped, or more
    # than this fraction of the last nonfinite_window steps
    t.nonfinite_max_consecutive = 5
    t.nonfinite_max_fraction = 0.1
    t.nonfinite_window = 100
    t.mtp_weight = 0.0  # lambda of the multi-token-prediction loss (MiniCPM4 report §2.3.2); 0 = no MTP head
    # a trained target (run dir or HF folder): train only the MTP/EAGLE draft head on top of it,
    # frozen (CPM.cu EAGLE draft); needs mtp_weight > 0 and the target's model config
    t.freeze_target = ""
    # a trained model (run dir, cpmjax checkpoint or HF folder) whose weights start a fresh run
    # (SFT, QAT); optimizer and LR schedule start afresh (warmup again); ignored on resume
    t.init_from = ""
    # how the MTP head meets the target (cpmjax.model.mtp.DRAFT_FORMS): mtp (MiniCPM4's MTP
    # head) | cpmcu (CPM.cu's EAGLE draft: post-norm target hidden in, raw projection out)
    t.draft_form = "mtp"
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
    d.instruct_families = ""  # instruction-set chat data: comma-separated families; empty: default
    d.long_conversations = "truncate"  # chat rows: a conversation over seq_len+1 tokens: or drop

    # BitCPM ternary quantization-aware training (cpmjax.quant.ternary; MiniCPM4 report §3.3)
    cfg.qat = q = ml_collections.ConfigDict()
    q.enabled = False
    q.group_size = 128  # input rows per absmean scale; -1 per output channel; 0 per tensor
    q.targets = "wq,wk,wv,wo,w_gate,w_up,w_down"  # may add embed, lm_head
    q.act_bits = 0  # 8: int8 per-token activations (BitNet b1.58); 0: compute dtype

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


_CHOICES = {
    "train.parametrization": ("mup", "standard"),
    "train.schedule": ("wsd", "cosine", "constant"),
    "train.decay_shape": ("exponential", "linear", "cosine", "1-sqrt"),
    "train.compute_dtype": ("float32", "bfloat16", "float16"),
    "train.remat": ("none", "full", "dots", "dots_no_batch"),
    "train.on_nonfinite": ("skip", "stop"),
    "data.source_type": ("jsonl", "text", "arrayrecord"),
    "data.format": ("text", "chat"),
    "data.long_conversations": ("truncate", "drop"),
    "train.draft_form": DRAFT_FORMS,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rules(cfg: ml_collections.ConfigDict) -> list[tuple[str, Callable[[Any], bool], str]]:
    """(section.field, predicate, rule) for every scalar field."""
    t = cfg.train
    positive_int = (lambda v: _is_int(v) and v >= 1, "must be an integer >= 1")
    rules = [(f"train.{f}", *positive_int) for f in
             ("steps", "seq_len", "global_batch_size", "grad_accum", "log_every", "eval_every",
              "eval_batches", "nonfinite_max_consecutive", "nonfinite_window")]
    rules += [(f"checkpoint.{f}", *positive_int) for f in ("every", "keep")]
    rules += [(f"train.{f}", lambda v: _is_int(v) and v >= 0, "must be an integer >= 0")
              for f in ("seed", "warmup_steps")]
    rules += [(f"train.{f}", lambda v: _is_number(v) and v > 0, "must be a finite number > 0")
              for f in ("lr", "eps")]
    rules += [(f"train.{f}", lambda v: _is_number(v) and v >= 0, "must be a finite number >= 0")
              for f in ("weight_decay", "clip_norm", "mtp_weight", "peak_flops")]
    rules += [(f"train.{f}", lambda v: _is_number(v) and 0 <= v < 1, "must be in [0, 1)")
              for f in ("b1", "b2")]
    rules += [(f"train.{f}", lambda v: _is_number(v) and 0 <= v <= 1, "must be in [0, 1]")
              for f in ("decay_fraction", "nonfinite_max_fraction")]
    rules += [("train.final_lr_ratio", lambda v: _is_number(v) and 0 < v <= 1,
               "must be in (0, 1]")]
    rules += [(f, lambda v, c=c: v in c, f"must be one of {', '.join(c)}")
              for f, c in _CHOICES.items()]
    rules += [(f"train.{f}", lambda v: isinstance(v, bool), "must be true or false")
              for f in ("decay_embeddings", "mtp_distill")]
    rules += [("checkpoint.async_save", lambda v: isinstance(v, bool), "must be true or false")]
    rules += [(f"mesh.{f}", lambda v: _is_int(v) and (v >= 1 or v == -1),
               "must be an integer >= 1, or -1 for the remaining devices")
              for f in ("data", "fsdp", "tensor")]
    rules += [(f"data.{f}", lambda v: isinstance(v, str), "must be a string")
              for f in ("cache_dir", "train_files", "valid_file", "weights", "tokenizer")]
    rules += [(f"train.{f}", lambda v: isinstance(v, str), "must be a string")
              for f in ("freeze_target", "init_from")]
    rules += [("data.instruct_families",
               lambda v: isinstance(v, str) and all(f in KNOWN_FAMILIES
                                                    for f in parse_families(v) or ()),
               f"must be comma-separated names of {', '.join(KNOWN_FAMILIES)}")]
    rules += [("qat.enabled", lambda v: isinstance(v, bool), "must be true or false")]
    rules += [(f"qat.{f}", _is_int, "must be an integer") for f in ("group_size", "act_bits")]
    rules += [("name", lambda v: isinstance(v, str) and v.strip() != "", "must be a non-empty "
               "string")]
    if _is_int(t.get("global_batch_size")) and _is_int(t.get("grad_accum")):
        rules.append(("train.grad_accum", lambda v: t.global_batch_size % v == 0,
                      f"must divide train.global_batch_size ({t.global_batch_size})"))
    return rules


def _get(cfg: ml_collections.ConfigDict, field: str) -> Any:
    node: Any = cfg
    for key in field.split("."):
        if key not in node:
            raise ConfigError(f"config field '{field}': missing (the config file must define it)")
        node = node[key]
    return node


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The experiment's ModelConfig; its errors name the field as ``model.<field>``."""
    try:
        return ModelConfig.from_hf_config(cfg.model.to_dict())
    except ConfigError as e:
        raise ConfigError(str(e).replace("config field '", "config field 'model.", 1)) from e


def check_experiment(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """Validate the whole experiment config before anything is compiled or written; every error
    names ``section.field`` and the rule. Returns the model config."""
    for field, ok, rule in _rules(cfg):
        value = _get(cfg, field)
        if not ok(value):
            raise ConfigError(f"config field '{field}': {rule} (got {value!r})")
    model = model_config(cfg)
    kernel_names(cfg)
    t, d = cfg.train, cfg.data
    if t.seq_len > model.max_position_embeddings:
        raise ConfigError(f"config field 'train.seq_len': {t.seq_len} exceeds "
                          f"model.max_position_embeddings ({model.max_position_embeddings})")
    if t.freeze_target and t.mtp_weight <= 0:
        raise ConfigError("config field 'train.freeze_target' trains only the MTP draft head: "
                          f"set train.mtp_weight > 0 (got {t.mtp_weight})")
    if t.freeze_target and t.init_from:
        raise ConfigError("config fields 'train.init_from' and 'train.freeze_target' both name "
                          "starting weights; set one")
    if cfg.qat.enabled:
        from cpmjax.quant.ternary import TernaryConfig  # pulls in the model; import on use

        TernaryConfig.from_dict(cfg.qat).validate(model)
    files = [f.strip() for f in d.train_files.split(",") if f.strip()]
    if d.weights.strip():
        if not files:
            raise ConfigError("config field 'data.weights': mixture weights need "
                              "data.train_files (the default corpus is a single source)")
        try:
            weights = [float(w) for w in d.weights.split(",")]
        except ValueError:
            raise ConfigError(f"config field 'data.weights': must be comma-separated numbers "
                              f"(got {d.weights!r})") from None
        if len(weights) != len(files):
            raise ConfigError(f"config field 'data.weights': {len(weights)} weights for "
                              f"{len(files)} train files")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ConfigError(f"config field 'data.weights': every weight must be a finite "
                              f"number > 0 (got {d.weights!r})")
    for field, paths in (("data.train_files", files),
                         ("data.valid_file", [d.valid_file] if d.valid_file else [])):
        for path in paths:
            if not os.path.exists(path):
                raise ConfigError(f"config field '{field}': {path} does not exist")
    if d.tokenizer and not (os.path.isfile(d.tokenizer) or
                            os.path.isfile(os.path.join(d.tokenizer, "tokenizer.json"))):
        raise ConfigError(f"config field 'data.tokenizer': no tokenizer.json at {d.tokenizer}")
    return model
