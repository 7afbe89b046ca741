"""The training loop: data, sharded state, steps, evaluation, metrics and checkpoints.

Order of a start: the whole experiment config is validated and the data read (nothing written
yet); then the workdir is locked and checked against the run it holds (``RunDir``); only then is
anything written. A run stops with a non-zero exit (never a silent 0) when a checkpoint save fails
(``CheckpointSaveError``, raised within a step of the failure), when a step is non-finite under
``train.on_nonfinite=stop``, or when skipped non-finite steps exceed the skip budget.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
from typing import Any, Collection

import jax
import jax.numpy as jnp
import ml_collections

from cpmjax.config import ModelConfig
from cpmjax.model.mtp import save_mtp
from cpmjax.parallel import make_mesh
from cpmjax.parallel.sharding import InMesh
from cpmjax.quant.ternary import transforms_for_run
from cpmjax.train import checkpoint as ckpt
from cpmjax.train.experiment import check_experiment, kernel_names
from cpmjax.train.init_from import load_matching_params
from cpmjax.train.inputs import TrainInputs, make_inputs
from cpmjax.train.metrics import MetricsWriter, device_peak_flops, flops_per_token
from cpmjax.train.optimizer import make_optimizer, make_schedule
from cpmjax.train.rundir import RunDir
from cpmjax.train.step import (batch_sharding, init_state, jit_train_step, make_eval_step,
                               make_train_step, state_shardings)

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A non-finite step under ``train.on_nonfinite=stop``, skipped steps past the skip budget,
    or parameters that are no longer finite."""


class SkipBudget:
    """Steps skipped for a non-finite loss or gradient (``train.on_nonfinite=skip``), checked
    against ``train.nonfinite_max_consecutive`` and ``nonfinite_max_fraction`` of the last
    ``nonfinite_window`` steps. Flags stay on the device until ``settle`` (at log steps and
    before saves), so skipping costs no host sync per step."""

    def __init__(self, t: ml_collections.ConfigDict) -> None:
        self.max_consecutive = t.nonfinite_max_consecutive
        self.max_fraction, self.window = t.nonfinite_max_fraction, t.nonfinite_window
        self._recent: collections.deque[bool] = collections.deque(maxlen=self.window)
        self._pending: list[tuple[int, jax.Array]] = []
        self._run: list[int] = []

    def add(self, step: int, finite: jax.Array) -> None:
        self._pending.append((step, finite))

    def settle(self) -> None:
        pending, self._pending = self._pending, []
        for step, finite in pending:
            skipped = not bool(finite)
            self._recent.append(skipped)
            self._run = self._run + [step] if skipped else []
            if len(self._run) >= self.max_consecutive:
                raise NonFiniteError(
                    f"non-finite loss or gradient in {len(self._run)} consecutive steps "
                    f"({self._run[0]}-{step}), the limit of "
                    f"train.nonfinite_max_consecutive={self.max_consecutive}; stopping")
            if sum(self._recent) > self.max_fraction * self.window:
                raise NonFiniteError(
                    f"non-finite loss or gradient in {sum(self._recent)} of the last "
                    f"{len(self._recent)} steps (up to step {step}), more than "
                    f"train.nonfinite_max_fraction={self.max_fraction} of "
                    f"train.nonfinite_window={self.window}; stopping")


def train(cfg: ml_collections.ConfigDict, workdir: str, new_run: bool = False,
          supervisor_files: Collection[str] = ()) -> dict[str, Any]:
    """Train, resuming from the newest complete and intact checkpoint in ``workdir`` (see
    ``RunDir`` for what a workdir accepts, ``new_run`` and ``supervisor_files``); returns final
    metrics."""
    model_cfg = check_experiment(cfg)
    inputs = make_inputs(cfg, model_cfg.vocab_size, jax.process_index(), jax.process_count())
    primary = jax.process_index() == 0
    with RunDir(workdir, primary, supervisor_files) as run:
        run.prepare(json.loads(cfg.to_json_best_effort()), model_cfg.to_hf_config(),
                    inputs.tokenizer, new_run)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("cpmjax run dir prepared")
        return _run(cfg, model_cfg, run, inputs)


def _run(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, run: RunDir,
         inputs: TrainInputs) -> dict[str, Any]:
    t = cfg.train
    iterator, evals, baseline = inputs.iterator, inputs.evals, inputs.baseline
    kernels = kernel_names(cfg)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    dtype = jnp.dtype(t.compute_dtype)
    tx = make_optimizer(t, model_cfg)
    schedule = make_schedule(t)
    with_mtp = t.mtp_weight > 0
    init = lambda k: init_state(model_cfg, tx, k, t.parametrization, with_mtp)
    abstract = jax.eval_shape(init, jax.random.key(t.seed))
    state_sh = state_shardings(model_cfg, abstract, mesh)
    batch_shape = (t.global_batch_size, t.seq_len)
    transforms = transforms_for_run(cfg.get("qat"), model_cfg)  # None unless ternary QAT
    step_fn = jit_train_step(make_train_step(model_cfg, tx, grad_accum=t.grad_accum, dtype=dtype,
                                             remat=t.remat, mtp_weight=t.mtp_weight,
                                             freeze_model=bool(t.get("freeze_target")),
                                             mtp_distill=bool(t.get("mtp_distill")),
                                             draft_form=t.get("draft_form", "mtp"),
                                             transforms=transforms, **kernels),
                             state_sh, mesh, batch_shape)
    eval_fn = InMesh(jax.jit(make_eval_step(model_cfg, dtype, transforms, **kernels)), mesh)

    checkpointer = ckpt.TrainCheckpointer(run.path, cfg.checkpoint.keep,
                                          cfg.checkpoint.async_save)
    restored = checkpointer.restore(jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh))
    if restored is None:
        state = jax.jit(init, out_shardings=state_sh)(jax.random.key(t.seed))
        start_from = t.get("freeze_target") or t.get("init_from")
        if start_from:
            field = "train.freeze_target" if t.get("freeze_target") else "train.init_from"
            state["params"] = jax.device_put(load_matching_params(start_from, model_cfg, field),
                                             state_sh["params"])
            print(f"weights from {start_from}", flush=True)
        start = 0
    else:
        start, state, data_state = restored
        iterator.set_state(data_state)
        print(f"resumed from step {start}", flush=True)

    writer = MetricsWriter(run.path, enabled=run.primary, resume_step=start)
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
    budget = SkipBudget(t)
    skipped_logged = int(state["nonfinite_steps"])
    window_start, window_steps = time.perf_counter(), 0
    finished = False
    try:
        for step in range(start, t.steps):
            checkpointer.check()  # a failed background save stops the run here, not later
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
            budget.add(done, m["finite"])
            if done % t.log_every == 0 or done == t.steps:
                loss, skipped = float(m["loss"]), int(state["nonfinite_steps"])
                if skipped > skipped_logged:
                    log.warning("%d step(s) up to step %d had a non-finite loss or gradient; "
                                "their updates were skipped", skipped - skipped_logged, done)
                    skipped_logged = skipped
                step_time = ((time.perf_counter() - window_start) / window_steps
                             if window_steps else None)
                tps = t.global_batch_size * t.seq_len / step_time if step_time else None
                last.update(loss=loss, lr=float(schedule(done - 1)),
                            grad_norm=float(m["grad_norm"]), tokens_per_sec=tps,
                            step_time=step_time,
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
                budget.settle()
                window_start, window_steps = time.perf_counter(), 0
            if done % cfg.checkpoint.every == 0 or done == t.steps:
                budget.settle()
                if not ckpt.all_finite(state["params"]):
                    raise NonFiniteError(f"the parameters are non-finite at step {done}; not "
                                         "saving them (the newest checkpoint is step "
                                         f"{checkpointer.last_complete})")
                checkpointer.save(done, state, iterator.get_state(), cfg.to_dict())
        checkpointer.close()
        finished = True
    finally:
        if not finished:  # finish an in-flight save; the error being raised is the one to report
            with contextlib.suppress(Exception):
                checkpointer.close()
        writer.close()
    if t.get("freeze_target") and run.primary:
        save_mtp(model_cfg, jax.device_get(state["mtp_params"]), run.path / "draft.safetensors",
                 t.get("draft_form", "mtp"))
        print(f"draft head written to {run.path / 'draft.safetensors'} (EAGLE layout)",
              flush=True)
    return last

