"""The training loop: data, sharded state, steps, evaluation, metrics and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cpmjax.config import ConfigError, ModelConfig
from cpmjax.data import (Source, eval_batches, get_or_build_default_tokenizer, load_tokenizer,
                         make_batch_iterator, read_documents, tokenize_documents, unigram_loss)
from cpmjax.data.corpus import build_default_corpus
from cpmjax.model.mtp import save_mtp
from cpmjax.parallel import make_mesh
from cpmjax.parallel.sharding import InMesh
from cpmjax.train import checkpoint as ckpt
from cpmjax.train.experiment import kernel_names
from cpmjax.train.metrics import MetricsWriter, device_peak_flops, flops_per_token
from cpmjax.train.optimizer import make_optimizer, make_schedule
from cpmjax.train.step import (batch_sharding, init_state, jit_train_step, make_eval_step,
                               make_train_step, state_shardings)

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Raised with ``train.on_nonfinite=stop`` when a step has a non-finite loss or gradient."""


@dataclasses.dataclass
class DataSetup:
    train_sources: list[Source]
    valid: Source
    tokenizer: str


def resolve_data(cfg: ml_collections.ConfigDict, vocab_size: int) -> DataSetup:
    d = cfg.data
    if d.train_files:
        files = [f.strip() for f in d.train_files.split(",") if f.strip()]
        weights = ([float(w) for w in d.weights.split(",")] if d.weights else [1.0] * len(files))
        if len(weights) != len(files):
            raise ConfigError(f"config field 'data.weights': {len(weights)} weights for "
                              f"{len(files)} train files")
        sources = [Source(f, d.source_type, w) for f, w in zip(files, weights)]
        valid = Source(d.valid_file or files[0], d.source_type)
    else:
        corpus = build_default_corpus(d.cache_dir)
        sources = [Source(str(corpus / "train.jsonl"))]
        valid = Source(str(corpus / "valid.jsonl"))
    tokenizer = d.tokenizer or str(get_or_build_default_tokenizer(d.cache_dir, vocab_size))
    tok_vocab = load_tokenizer(tokenizer).get_vocab_size()
    if tok_vocab > vocab_size:
        raise ConfigError(f"config field 'model.vocab_size': {vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({tok_vocab}) at {tokenizer}")
    return DataSetup(sources, valid, tokenizer)


def _unigram_baseline(data: DataSetup, vocab_size: int) -> float:
    train = tokenize_documents(read_documents(data.train_sources[0].path,
                                              data.train_sources[0].type), data.tokenizer)
    valid = tokenize_documents(read_documents(data.valid.path, data.valid.type), data.tokenizer)
    return unigram_loss(train, valid, vocab_size)


def check_train_config(t: ml_collections.ConfigDict) -> None:
    """Fail before any compile with a message naming the bad field."""
    if t.on_nonfinite not in ("skip", "stop"):
        raise ConfigError(f"config field 'train.on_nonfinite': {t.on_nonfinite!r} is not "
                          "'skip' or 'stop'")
    if t.grad_accum < 1 or t.global_batch_size % t.grad_accum:
        raise ConfigError(f"config field 'train.grad_accum': {t.grad_accum} must be >= 1 and "
                          f"divide train.global_batch_size ({t.global_batch_size})")
    if t.mtp_weight < 0:
        raise ConfigError(f"config field 'train.mtp_weight': {t.mtp_weight} is negative")
    if t.get("freeze_target") and t.mtp_weight <= 0:
        raise ConfigError("config field 'train.freeze_target' trains only the MTP draft head: "
                          f"set train.mtp_weight > 0 (got {t.mtp_weight})")
    for field in ("steps", "seq_len", "global_batch_size", "log_every", "eval_every"):
        if t[field] < 1:
            raise ConfigError(f"config field 'train.{field}': {t[field]} must be >= 1")


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (resuming from the newest good checkpoint in ``workdir``); returns final metrics."""
    t = cfg.train
    check_train_config(t)
    kernels = kernel_names(cfg)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_cfg = ModelConfig.from_hf_config(cfg.model.to_dict())
    (work / "config.json").write_text(json.dumps(model_cfg.to_hf_config(), indent=2) + "\n")
    (work / "experiment.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
    data = resolve_data(cfg, model_cfg.vocab_size)

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    dtype = jnp.dtype(t.compute_dtype)
    tx = make_optimizer(t, model_cfg)
    schedule = make_schedule(t)
    with_mtp = t.mtp_weight > 0
    init = lambda k: init_state(model_cfg, tx, k, t.parametrization, with_mtp)
    abstract = jax.eval_shape(init, jax.random.key(t.seed))
    state_sh = state_shardings(model_cfg, abstract, mesh)
    batch_shape = (t.global_batch_size, t.seq_len)
    step_fn = jit_train_step(make_train_step(model_cfg, tx, grad_accum=t.grad_accum, dtype=dtype,
                                             remat=t.remat, mtp_weight=t.mtp_weight,
                                             freeze_model=bool(t.get("freeze_target")),
                                             mtp_distill=bool(t.get("mtp_distill")), **kernels),
                             state_sh, mesh, batch_shape)
    eval_fn = InMesh(jax.jit(make_eval_step(model_cfg, dtype, **kernels)), mesh)

    checkpointer = ckpt.TrainCheckpointer(work, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    restored = checkpointer.restore(jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh))
    iterator = make_batch_iterator(data.train_sources, data.tokenizer, t.seq_len,
                                   t.global_batch_size, t.seed, jax.process_index(),
                                   jax.process_count())
    if restored is None:
        state = jax.jit(init, out_shardings=state_sh)(jax.random.key(t.seed))
        if t.get("freeze_target"):
            state["params"] = jax.device_put(_frozen_target(t.freeze_target, model_cfg),
                                             state_sh["params"])
        start = 0
    else:
        start, state, data_state = restored
        iterator.set_state(data_state)
        print(f"resumed from step {start}", flush=True)

    evals = eval_batches(data.valid, data.tokenizer, t.seq_len, t.global_batch_size,
                         t.eval_batches)
    baseline = _unigram_baseline(data, model_cfg.vocab_size)
    writer = MetricsWriter(work, enabled=jax.process_index() == 0)
    peak = device_peak_flops(t.peak_flops or None)
    flops_tok = flops_per_token(model_cfg, t.seq_len)
    bsh = batch_sharding(mesh, batch_shape)
    print(f"training {cfg.name}: {t.steps} steps, unigram baseline loss {baseline:.4f}", flush=True)

    per_host = t.global_batch_size // jax.process_count()
    host_rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)

    def evaluate(params: Any) -> float:
        """Held-out NLL per token; every host holds the full eval batches and feeds its rows."""
        sums = [eval_fn(params, jax.make_array_from_process_local_data(
            bsh, {k: v[host_rows] for k, v in b.items()}, batch_shape)) for b in evals]
        return float(sum(s for s, _ in sums) / sum(c for _, c in sums))

    last: dict[str, Any] = {"unigram_loss": baseline}
    skipped_logged = int(state["nonfinite_steps"])
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start, t.steps):
        batch = jax.make_array_from_process_local_data(bsh, next(iterator), batch_shape)
        state, m = step_fn(state, batch)
        done = step + 1
        if step == start:  # keep compilation out of the throughput figures
            jax.block_until_ready(m["loss"])
            print(f"step {done} (compilation included) took "
                  f"{time.perf_counter() - window_start:.1f}s", flush=True)
            window_start = time.perf_counter()
        else:
            window_steps += 1
        if t.on_nonfinite == "stop" and not bool(m["finite"]):  # a host sync every step
            raise NonFiniteError(f"non-finite loss or gradient at step {done}")
        if done % t.log_every == 0 or done == t.steps:
            loss, skipped = float(m["loss"]), int(state["nonfinite_steps"])
            if skipped > skipped_logged:
                log.warning("%d step(s) up to step %d had a non-finite loss or gradient; their "
                            "updates were skipped", skipped - skipped_logged, done)
                skipped_logged = skipped
            step_time = ((time.perf_counter() - window_start) / window_steps
                         if window_steps else None)
            tps = t.global_batch_size * t.seq_len / step_time if step_time else None
            last.update(loss=loss, lr=float(schedule(done - 1)), grad_norm=float(m["grad_norm"]),
                        tokens_per_sec=tps, step_time=step_time,
                        mfu=(tps * flops_tok / (peak * jax.device_count()))
                        if peak and tps else None,
                        nonfinite_steps=skipped)
            if "mtp_loss" in m:
                last["mtp_loss"] = float(m["mtp_loss"])
            if done % t.eval_every == 0 or done == t.steps:
                last["eval_loss"] = evaluate(state["params"])
            else:
                last.pop("eval_loss", None)
            writer.write(done, {k: v for k, v in last.items() if k != "unigram_loss"})
            window_start, window_steps = time.perf_counter(), 0
        if done % cfg.checkpoint.every == 0 or done == t.steps:
            checkpointer.save(done, state, iterator.get_state(), cfg.to_dict())
    checkpointer.close()
    writer.close()
    if t.get("freeze_target") and jax.process_index() == 0:
        save_mtp(model_cfg, jax.device_get(state["mtp_params"]), work / "draft.safetensors")
        print(f"draft head written to {work / 'draft.safetensors'} (EAGLE layout)", flush=True)
    return last


def _frozen_target(path: str, model_cfg: ModelConfig) -> Any:
    """The trained target's params; its config must be the run's model config."""
    target_cfg, params = ckpt.load_model(path)
    ours, theirs = model_cfg.to_hf_config(), target_cfg.to_hf_config()
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        raise ConfigError(f"config field 'train.freeze_target': the model at {path} differs from "
                          f"this config's model in {', '.join(diff)}")
    return params
