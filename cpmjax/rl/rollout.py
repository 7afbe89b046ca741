"""Chunk-wise rollout through the serving engine (MiniCPM4 report, arXiv 2506.07900 §3.2,
Algorithm 1).

One *round* generates at most ``chunk_tokens`` new tokens for every unfinished trajectory: those
carried over in the replay buffer, plus new groups of ``group_size`` samples of fresh prompts up
to ``rollout_batch`` trajectories. Everything goes through the scheduler's continuous batching at
the current parameters; the engine reports each sampled token's log-probability under the
distribution it sampled from (``logprobs_mode="processed"``: ``softmax(logits / temperature)``,
the one the loss evaluates; RL sampling uses no top-k, top-p or penalties), recorded with the
policy version. Trajectories that stop (a stop token) or reach ``max_response`` are done; the
others stay in the buffer and continue next round, after the update, under the new policy. When
every member of a group is done the group is scored and, with dynamic sampling (DAPO, arXiv
2503.14476 §3.2), kept only if its rewards differ. With ``chunk_tokens == max_response`` a round
waits for every response: vanilla rollout, the baseline the report compares against.

A trajectory continues by re-prefilling its prompt and response so far under the new parameters
rather than keeping its KV-cache slot across the update: every chunk is then sampled from exactly
one policy version, which the chunk-level importance ratio assumes (a cache written by the old
weights would make the sampler a mix of both), slots are free for new prompts while the model
trains, and the buffer is plain token lists that a checkpoint stores and a restart continues
bit for bit. The cost is one prefill of the context per chunk, small next to decoding it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from cpmjax.model.params import Params
from cpmjax.rl.advantage import informative
from cpmjax.rl.buffer import Group, RolloutState, Trajectory, enforce_staleness, prompt_order
from cpmjax.rl.prompts import PromptSet
from cpmjax.rl.rewards import soft_overlong_penalty
from cpmjax.serve.engine import DecodeEngine
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import Scheduler

OVERLONG = ("filter", "penalty", "none")
_EVAL_STREAM = 2**32  # sampling-seed stream of evaluation (group ids stay below it)


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    group_size: int  # G samples per prompt
    rollout_batch: int  # trajectories per round (unfinished ones first, then new groups)
    chunk_tokens: int  # per trajectory per round; == max_response: vanilla rollout
    max_response: int
    stop_token_ids: tuple[int, ...]
    temperature: float = 1.0
    dynamic_sampling: bool = True
    overlong: str = "filter"  # truncated responses: out of the loss | soft penalty | as is
    overlong_buffer: int = 16
    max_staleness: int = 4
    stale_policy: str = "restart"
    seed: int = 0


def sampling_seed(*parts: int) -> int:
    """A per-(run, group, member, chunk, restart) seed, so a chunk's samples do not depend on
    what else shares the batch and a restarted run draws the same ones."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % (2**31))


class ChunkedRollout:
    """Rounds of chunk-wise rollout over one engine; ``set_params`` swaps the policy in."""

    def __init__(self, engine: DecodeEngine, params: Params, prompts: PromptSet,
                 settings: RolloutSettings) -> None:
        self.engine, self.prompts, self.s = engine, prompts, settings
        self.train_prompts = prompts.prompts("train")
        self.scheduler = Scheduler(engine, params, max_queue=1 << 20)

    def set_params(self, params: Params) -> None:
        """Use ``params`` from the next round on: a jit argument of the engine's steps, so
        parameters of the same shapes recompile nothing."""
        self.scheduler.params = params

    def _new_group(self, state: RolloutState) -> Group:
        index = prompt_order(len(self.train_prompts), state.prompts_drawn, self.s.seed)
        state.prompts_drawn += 1
        prompt = list(self.train_prompts[index])
        group = Group(state.next_group_id, index,
                      [Trajectory(prompt) for _ in range(self.s.group_size)])
        state.next_group_id += 1
        return group

    def _fill(self, state: RolloutState) -> None:
        while len(state.unfinished()) + self.s.group_size <= self.s.rollout_batch:
            state.in_flight.append(self._new_group(state))

    def _sampling(self, group: Group, member: int, traj: Trajectory) -> SamplingParams:
        return SamplingParams(temperature=self.s.temperature,
                              seed=sampling_seed(self.s.seed, group.id, member, traj.chunks,
                                                 traj.restarts))

    def generate(self, state: RolloutState) -> dict[str, Any]:
        """Generate one chunk for every unfinished trajectory (after the staleness bound and
        filling the batch with new groups); returns the round's counts and timing."""
        enforce_staleness(state, self.s.max_staleness, self.s.stale_policy)
        self._fill(state)
        submitted = []
        for g in state.in_flight:
            for i, traj in enumerate(g.members):
                if traj.done:
                    continue
                budget = min(self.s.chunk_tokens, self.s.max_response - len(traj.response))
                req = self.scheduler.submit(traj.prompt + traj.response, budget,
                                            self._sampling(g, i, traj), self.s.stop_token_ids,
                                            logprobs=0)
                submitted.append((traj, req))
        start = time.perf_counter()
        self.scheduler.run_until_done()
        seconds = time.perf_counter() - start
        tokens = 0
        for traj, req in submitted:
            if req.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"rollout request {req.id} ended with {req.finish_reason!r}"
                                   f" ({req.error or self.scheduler.error!r})")
            traj.extend(req.output, [lp for lp, _, _ in req.token_logprobs], state.version)
            tokens += len(req.output)
            if req.finish_reason == "stop":
                traj.finish = "stop"
            elif len(traj.response) >= self.s.max_response:
                traj.finish = "length"
        state.count("generated_tokens", tokens)
        return {"tokens": tokens, "seconds": seconds, "requests": len(submitted),
                **self._score_finished(state)}

    def _score_finished(self, state: RolloutState) -> dict[str, Any]:
        """Move groups whose members are all done out of flight: scored, then kept or dropped."""
        still, rewards, accepted, dropped = [], [], 0, 0
        for g in state.in_flight:
            if not g.done:
                still.append(g)
                continue
            g.rewards = [self.reward(g, m) for m in g.members]
            rewards += g.rewards
            if self.s.dynamic_sampling and not informative(g.rewards):
                dropped += 1
                state.count("uninformative_groups")
            else:
                accepted += 1
                state.ready.append(g)
        state.in_flight = still
        return {"finished_groups": accepted + dropped, "accepted_groups": accepted,
                "dropped_groups": dropped, "rewards": rewards}

    def reward(self, group: Group, traj: Trajectory) -> float:
        r = self.prompts.reward("train", group.prompt_index, traj.response)
        if self.s.overlong == "penalty":
            r += soft_overlong_penalty(len(traj.response), self.s.max_response,
                                       self.s.overlong_buffer)
        return r

    def evaluate(self, split: str = "heldout", temperature: float = 0.0) -> dict[str, float]:
        """Mean reward of one response per prompt of ``split`` at ``temperature`` (0: greedy),
        with the response budget of training and no overlong penalty; mean response length and
        the share of responses cut at the budget."""
        prompts = self.prompts.prompts(split)
        seed = lambda i: sampling_seed(self.s.seed, _EVAL_STREAM, i)
        reqs = [self.scheduler.submit(list(p), self.s.max_response,
                                      SamplingParams(temperature=temperature, seed=seed(i)),
                                      self.s.stop_token_ids) for i, p in enumerate(prompts)]
        self.scheduler.run_until_done()
        rewards = [self.prompts.reward(split, i, r.output) for i, r in enumerate(reqs)]
        return {"reward": float(np.mean(rewards)),
                "length": float(np.mean([len(r.output) for r in reqs])),
                "truncated": float(np.mean([r.finish_reason != "stop" for r in reqs]))}
