"""Trajectories, groups and the replay buffer that chunk-wise rollout carries between steps.

MiniCPM4's Algorithm 1 (arXiv 2506.07900 §3.2) keeps a replay buffer R of unfinished
trajectories, a dynamic-sampling buffer B of finished groups that passed the filter, and the
log-probabilities of every generated token. Here one :class:`RolloutState` holds all three: groups
in flight (R: at least one member unfinished), ready groups (B) and, per token, the behaviour
log-probability and the policy version that sampled it. It is plain data and round-trips through
JSON exactly (log-probs are float32 values, which a Python float holds exactly), so it is saved
with every training checkpoint and a restart continues with the same buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

FINISH = ("stop", "length")  # a stop token, or the response reached its maximum length
STALE_POLICIES = ("drop", "restart")


@dataclasses.dataclass
class Trajectory:
    """One sampled response to a prompt, generated chunk by chunk."""

    prompt: list[int]
    response: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)  # behaviour, per token
    versions: list[int] = dataclasses.field(default_factory=list)  # policy version per token
    finish: str | None = None  # None while unfinished, else one of FINISH
    chunks: int = 0  # rollout rounds it was generated in
    restarts: int = 0  # times it was restarted for staleness

    @property
    def done(self) -> bool:
        return self.finish is not None

    def extend(self, tokens: list[int], logprobs: list[float], version: int) -> None:
        if len(tokens) != len(logprobs):
            raise ValueError(f"{len(tokens)} tokens but {len(logprobs)} log-probabilities")
        self.response += [int(t) for t in tokens]
        self.logprobs += [float(x) for x in logprobs]
        self.versions += [int(version)] * len(tokens)
        self.chunks += 1

    def staleness(self, version: int) -> int:
        """Policy versions between the oldest token's and ``version`` (0 if nothing yet)."""
        return version - min(self.versions) if self.versions else 0

    def restart(self) -> None:
        """Forget the response; it is generated again from the prompt."""
        self.response, self.logprobs, self.versions = [], [], []
        self.finish, self.chunks, self.restarts = None, 0, self.restarts + 1


@dataclasses.dataclass
class Group:
    """G trajectories of one prompt (``prompt_index`` into the task's train split)."""

    id: int
    prompt_index: int
    members: list[Trajectory]
    rewards: list[float] | None = None  # set once every member is done

    @property
    def done(self) -> bool:
        return all(m.done for m in self.members)

    def staleness(self, version: int) -> int:
        return max(m.staleness(version) for m in self.members)


@dataclasses.dataclass
class RolloutState:
    """What the RL loop carries from step to step (see module doc)."""

    version: int = 0  # policy updates so far; tokens sampled now get this version
    prompts_drawn: int = 0  # prompts taken from the train split (its epoch order is seeded)
    next_group_id: int = 0
    in_flight: list[Group] = dataclasses.field(default_factory=list)  # R
    ready: list[Group] = dataclasses.field(default_factory=list)  # B
    counters: dict[str, int] = dataclasses.field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + int(n)

    def unfinished(self) -> list[Trajectory]:
        return [m for g in self.in_flight for m in g.members if not m.done]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RolloutState":
        groups = lambda key: [Group(g["id"], g["prompt_index"],
                                    [Trajectory(**m) for m in g["members"]], g["rewards"])
                              for g in data[key]]
        return cls(version=data["version"], prompts_drawn=data["prompts_drawn"],
                   next_group_id=data["next_group_id"], in_flight=groups("in_flight"),
                   ready=groups("ready"), counters=dict(data["counters"]))


def prompt_order(n: int, drawn: int, seed: int) -> int:
    """Index of the ``drawn``-th prompt: each pass over the ``n`` prompts is a fresh permutation,
    a pure function of (seed, pass), so resuming needs only the count drawn."""
    epoch, i = divmod(drawn, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[i])


def enforce_staleness(state: RolloutState, max_staleness: int, policy: str) -> None:
    """Bound the policy lag of buffered tokens: a group holding a token sampled more than
    ``max_staleness`` versions ago is dropped whole (``"drop"``), or its stale members start over
    from the prompt under the current policy (``"restart"``); a restarted ready group goes back
    in flight. Counts ``stale_dropped`` groups and ``stale_restarted`` trajectories."""
    if policy not in STALE_POLICIES:
        raise ValueError(f"stale policy must be one of {STALE_POLICIES}, got {policy!r}")
    in_flight, ready = [], []
    ready_ids = {g.id for g in state.ready}
    for g in state.in_flight + state.ready:
        if g.staleness(state.version) <= max_staleness:
            (ready if g.id in ready_ids else in_flight).append(g)
        elif policy == "drop":
            state.count("stale_dropped")
        else:
            for m in g.members:
                if m.staleness(state.version) > max_staleness:
                    m.restart()
                    state.count("stale_restarted")
            g.rewards = None
            in_flight.append(g)
    state.in_flight, state.ready = in_flight, ready
