"""The RL loop: chunk-wise rollout on the serving engine, the training system's sharded update,
its checkpoints and resume (MiniCPM4 report, arXiv 2506.07900 §3.2, Algorithm 1).

One step: rollout rounds (:mod:`cpmjax.rl.rollout`) until ``groups_per_step`` informative groups
are ready (at most ``max_rounds``), then ``epochs x minibatches`` optimizer updates on them with
the RL objective through ``cpmjax.train.step.make_update_step`` on the run's mesh, then the new
parameters go into the engine (a jit argument: nothing recompiles) and the policy version grows
by one. The train state (params, optimizer, the KL reference model when used) is an orbax
checkpoint of the training system (``TrainCheckpointer``), and the rollout state (replay
buffer, ready groups, prompt cursor, version, counters) is its JSON item, so a restart resumes
mid-trajectory with the same buffer and produces the same later steps.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cpmjax.config import ConfigError, ModelConfig
from cpmjax.data import load_tokenizer
from cpmjax.parallel import make_mesh
from cpmjax.rl import config as rl_config
from cpmjax.rl.batch import group_rows, split_updates
from cpmjax.rl.buffer import RolloutState
from cpmjax.rl.loss import PolicyLoss, make_rl_train_step, target_logprobs
from cpmjax.rl.prompts import load_prompt_set, run_tokenizer
from cpmjax.rl.rollout import ChunkedRollout, RolloutSettings
from cpmjax.serve.engine import DecodeEngine, pow2_bucket
from cpmjax.train import checkpoint as ckpt
from cpmjax.train.experiment import check_experiment
from cpmjax.train.init_from import load_matching_params
from cpmjax.train.metrics import MetricsWriter
from cpmjax.train.optimizer import make_optimizer
from cpmjax.train.rundir import RunDir
from cpmjax.train.step import batch_sharding, init_state, jit_train_step, state_shardings

log = logging.getLogger(__name__)
_UPDATE_METRICS = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "dual_clip_frac", "ratio",
                   "abs_log_ratio", "grad_norm")


def _stop_ids(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig) -> tuple[int, ...]:
    """The model's eos ids and the tokens named by ``rl.stop_tokens``."""
    ids = set(model_cfg.eos_token_ids)
    names = [n.strip() for n in cfg.rl.stop_tokens.split(",") if n.strip()]
    tokenizer = run_tokenizer(cfg) if names else ""
    tok = load_tokenizer(tokenizer) if names else None
    for name in names:
        i = tok.token_to_id(name)
        if i is None:
            raise ConfigError(f"config field 'rl.stop_tokens': {name!r} is not a token of "
                              f"the tokenizer at {tokenizer}")
        ids.add(i)
    return tuple(sorted(ids))


def _copy_to(tree: Any, shardings: Any) -> Any:
    """A copy of ``tree`` laid out as ``shardings``: its own buffers, because the update donates
    the state and a reference model sharing the policy's buffers would be donated twice."""
    return jax.device_put(jax.tree.map(jnp.copy, tree), shardings)


class RLTrainer:
    """A resumable RL run in ``workdir``; ``step()`` runs one RL step and returns its metrics."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | Path,
                 write_metrics: bool = True, new_run: bool = False) -> None:
        model_cfg = self.model_cfg = check_experiment(cfg)
        rl_config.check_rl_config(cfg)
        self.cfg = cfg
        # the training system's run dir: one trainer per workdir, resumed only with its config
        self.run = RunDir(workdir)
        self.run.acquire()
        try:
            self.run.prepare(json.loads(cfg.to_json_best_effort()), model_cfg.to_hf_config(),
                             run_tokenizer(cfg), new_run)
            self._build(cfg, model_cfg, write_metrics)
        except BaseException:
            self.run.release()
            raise

    def _build(self, cfg: ml_collections.ConfigDict, model_cfg: ModelConfig,
               write_metrics: bool) -> None:
        r, t = cfg.rl, cfg.train
        self.work = self.run.path
        self.prompts = load_prompt_set(cfg)
        self.rows = r.groups_per_step * r.group_size
        self.loss = PolicyLoss(r.eps_low, r.eps_high, r.dual_clip or None, r.kl_coef,
                               r.temperature)
        self.dtype = jnp.dtype(t.compute_dtype)

        self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        tx = make_optimizer(t, model_cfg)
        with_ref = r.kl_coef > 0

        def init(key: jax.Array) -> dict[str, Any]:
            state = init_state(model_cfg, tx, key, t.parametrization)
            if with_ref:
                state["ref_params"] = state["params"]
            return state

        abstract = jax.eval_shape(init, jax.random.key(t.seed))
        self.state_sh = state_shardings(model_cfg, abstract, self.mesh)
        self._tx = tx
        self.checkpointer = ckpt.TrainCheckpointer(self.work, cfg.checkpoint.keep,
                                                   cfg.checkpoint.async_save)
        restored = self.checkpointer.restore(jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            self.state_sh))
        if restored is None:
            self.state = jax.jit(init, out_shardings=self.state_sh)(jax.random.key(t.seed))
            if t.init_from:
                params = load_matching_params(t.init_from, model_cfg, "train.init_from")
                self.state["params"] = _copy_to(params, self.state_sh["params"])
                if with_ref:
                    self.state["ref_params"] = _copy_to(params, self.state_sh["ref_params"])
            self.done, self.rs = 0, RolloutState()
        else:
            self.done, self.state, data = restored
            self.rs = RolloutState.from_json(data)
            print(f"resumed from step {self.done} (policy version {self.rs.version}, "
                  f"{len(self.rs.unfinished())} unfinished trajectories buffered)", flush=True)

        longest = max(len(p) for s in ("train", "heldout") for p in self.prompts.prompts(s))
        need = longest + r.max_response + 1
        if need > model_cfg.max_position_embeddings:
            raise ConfigError(f"config field 'rl.max_response': {r.max_response} tokens after "
                              f"a {longest}-token prompt exceed the model context "
                              f"({model_cfg.max_position_embeddings})")
        batch = rl_config.rollout_batch(r)
        engine = DecodeEngine(model_cfg, max_slots=batch,
                              max_len=min(pow2_bucket(need, 128),
                                          model_cfg.max_position_embeddings),
                              chunk=r.prefill_chunk, dtype=self.dtype,
                              logprobs_mode="processed")
        self.settings = RolloutSettings(
            group_size=r.group_size, rollout_batch=batch, chunk_tokens=rl_config.chunk_tokens(r),
            max_response=r.max_response, stop_token_ids=_stop_ids(cfg, model_cfg),
            temperature=r.temperature, dynamic_sampling=r.dynamic_sampling,
            overlong=r.overlong, overlong_buffer=r.overlong_buffer,
            max_staleness=r.max_staleness, stale_policy=r.stale_policy, seed=t.seed)
        self.rollout = ChunkedRollout(engine, self.state["params"], self.prompts, self.settings)
        self._steps: dict[int, Any] = {}
        self._ref_logprobs = jax.jit(lambda p, b: target_logprobs(
            p, model_cfg, b, r.temperature, self.dtype)[0])
        self.writer = MetricsWriter(self.work, enabled=write_metrics, resume_step=self.done)

    # ---- the update ----------------------------------------------------------------------
    def _step_fn(self, length: int) -> Any:
        """The jitted update for rows of ``length`` (one compilation per power-of-two length)."""
        if length not in self._steps:
            t = self.cfg.train
            step = make_rl_train_step(self.model_cfg, self._tx, self.loss,
                                      grad_accum=t.grad_accum, dtype=self.dtype, remat=t.remat)
            rows = self.rows // self.cfg.rl.minibatches
            self._steps[length] = jit_train_step(step, self.state_sh, self.mesh, (rows, length))
        return self._steps[length]

    def _pad_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows up to groups_per_step x group_size (zero rows carry no loss)."""
        n = len(batch["inputs"])
        return {k: np.concatenate([v, np.zeros((self.rows - n, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()}

    def _update(self, groups: list) -> dict[str, float]:
        r = self.cfg.rl
        batch = self._pad_rows(group_rows(groups, self.rs.version, r.overlong == "filter",
                                          r.adv_std_normalize))
        staleness, mask = batch.pop("staleness"), batch["loss_mask"] > 0
        parts = split_updates(batch, r.minibatches, r.loss_agg)
        length = batch["inputs"].shape[1]
        bsh = batch_sharding(self.mesh, (self.rows // r.minibatches, length))
        parts = [jax.device_put(p, bsh) for p in parts]
        if self.loss.kl_coef > 0:
            parts = [{**p, "ref_logprobs": self._ref_logprobs(self.state["ref_params"], p)}
                     for p in parts]
        step_fn, sums = self._step_fn(length), {k: 0.0 for k in _UPDATE_METRICS}
        start = time.perf_counter()
        for _ in range(r.epochs):
            for part in parts:
                self.state, m = step_fn(self.state, part)
                for k in _UPDATE_METRICS:
                    sums[k] += float(m[k])
                if self.cfg.train.on_nonfinite == "stop" and not bool(m["finite"]):
                    raise FloatingPointError(f"non-finite RL loss or gradient at step "
                                             f"{self.done + 1}")
        seconds = time.perf_counter() - start
        updates = r.epochs * r.minibatches
        tokens = float(batch["segment_ids"].sum())
        out = {k: v / updates for k, v in sums.items()}
        out.update(train_time=seconds, train_tokens_per_sec=tokens * r.epochs / seconds,
                   staleness_mean=float(staleness[mask].mean()) if mask.any() else 0.0,
                   staleness_max=int(staleness[mask].max()) if mask.any() else 0,
                   nonfinite_steps=int(self.state["nonfinite_steps"]))
        return out

    # ---- one RL step ---------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        r = self.cfg.rl
        start = time.perf_counter()
        rounds = []
        while len(self.rs.ready) < r.groups_per_step and len(rounds) < r.max_rounds:
            rounds.append(self.rollout.generate(self.rs))
        rollout_time = time.perf_counter() - start
        groups = self.rs.ready[:r.groups_per_step]
        self.rs.ready = self.rs.ready[r.groups_per_step:]
        if len(groups) < r.groups_per_step:
            log.warning("step %d: %d of %d groups after %d rounds (rl.max_rounds)",
                        self.done + 1, len(groups), r.groups_per_step, len(rounds))
        rewards = [x for rd in rounds for x in rd["rewards"]]
        tokens = sum(rd["tokens"] for rd in rounds)
        metrics: dict[str, Any] = {
            "version": self.rs.version, "rounds": len(rounds),
            "reward_mean": float(np.mean(rewards)) if rewards else None,
            "reward_std": float(np.std(rewards)) if rewards else None,
            "accepted_groups": sum(rd["accepted_groups"] for rd in rounds),
            "dropped_groups": sum(rd["dropped_groups"] for rd in rounds),
            "trained_groups": len(groups),
            "rollout_tokens": tokens, "rollout_time": rollout_time,
            "rollout_tokens_per_sec": tokens / max(sum(rd["seconds"] for rd in rounds), 1e-9),
            "buffered_trajectories": len(self.rs.unfinished()),
            "generated_tokens": self.rs.counters.get("generated_tokens", 0),
        }
        if groups:
            lengths = [len(m.response) for g in groups for m in g.members]
            metrics.update(
                train_reward_mean=float(np.mean([x for g in groups for x in g.rewards])),
                response_length_mean=float(np.mean(lengths)), response_length_max=max(lengths),
                response_length_p50=float(np.percentile(lengths, 50)),
                response_length_p90=float(np.percentile(lengths, 90)),
                truncated_frac=float(np.mean([m.finish == "length" for g in groups
                                              for m in g.members])),
                **self._update(groups))
            self.rs.version += 1
            self.rollout.set_params(self.state["params"])
            if r.kl_coef > 0 and r.ref_refresh_every and self.rs.version % r.ref_refresh_every == 0:
                self.state["ref_params"] = _copy_to(self.state["params"],
                                                    self.state_sh["ref_params"])
        for key in ("stale_dropped", "stale_restarted", "uninformative_groups"):
            metrics[key] = self.rs.counters.get(key, 0)
        self.done += 1
        metrics["step_time"] = time.perf_counter() - start
        if self.done % self.cfg.train.eval_every == 0 or self.done == self.cfg.train.steps:
            metrics.update(self.evaluate())
        if self.done % self.cfg.train.log_every == 0 or self.done == self.cfg.train.steps:
            self.writer.write(self.done, metrics)
        if self.done % self.cfg.checkpoint.every == 0 or self.done == self.cfg.train.steps:
            self.checkpointer.save(self.done, self.state, self.rs.to_json(), self.cfg.to_dict())
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out reward of the current policy (``rl.eval_temperature``; 0: greedy)."""
        out = self.rollout.evaluate("heldout", self.cfg.rl.eval_temperature)
        return {f"eval_{k}": v for k, v in out.items()}

    def close(self) -> None:
        try:
            self.checkpointer.close()
            self.writer.close()
        finally:
            self.run.release()


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, new_run: bool = False
          ) -> list[dict[str, Any]]:
    """Run (or resume) ``train.steps`` RL steps in ``workdir`` (``new_run``: move an earlier run
    there aside first); the metrics of each step run here, preceded by the starting policy's
    held-out evaluation (step 0) on a fresh run."""
    trainer = RLTrainer(cfg, workdir, new_run=new_run)
    history = []
    try:
        if trainer.done == 0:
            first = {"step": 0, **trainer.evaluate()}
            trainer.writer.write(0, {k: v for k, v in first.items() if k != "step"})
            history.append(first)
        while trainer.done < cfg.train.steps:
            history.append({"step": trainer.done + 1, **trainer.step()})
    finally:
        trainer.close()
    return history
