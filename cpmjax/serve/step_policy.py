"""Which decode-step kind to run, from the engine's own measured step costs.

Speculation pays when a round's extra tokens outweigh its extra compute: at batch 1 on a
memory-bound device a tree round costs little more than a plain step, while on a saturated
device (this CPU at batch 8) verifying a tree per row costs several plain steps. vLLM turns
speculation off above a batch size, and EAGLE-3/-4-style length selection picks the draft
length from measured acceptance; here the choice is made from measurements alone, per
batch-size bucket: each kind is tried a few times first, then the kind with the fastest
measured *pace* runs, and the others are re-tried now and then (at doubling intervals while the
choice stays the same and leads by 25%, each re-try a fresh probe) so that drifting costs (a
context growing, a request that drafts well) are seen. A re-try is never due sooner than its
measured extra time allows within an exploration ``budget`` (1% of the chosen kind's time by
default): at batch 8 on this CPU a tree round costs about four plain steps, and re-trying it at
the doubling intervals alone spent 2.8% of the first 500 steps at those costs (the policy
driven with them in ``tests/serve/test_step_policy.py``). A tree round also tells
each chain kind's tokens on the same rows (``paired`` in :meth:`StepCostPolicy.record`), so a
chain's pace is compared on the very requests the tree ran.

The pace of a step is the tokens of its slowest busy row per second (times the busy rows, so
that a plain step's pace is its throughput). Choosing by it, a kind is picked only when every
busy row progresses faster than under the others: the mean tokens per row would pick a
speculative round at batch 8 on this CPU that raises throughput while a low-acceptance row
falls behind, and the batch then ends later than with plain steps (the requests of a batch
finish with their slowest row).

The choice changes speed only: the engine's steps emit the same tokens whichever kind runs
(``cpmjax.serve.tree``, rule ``"coupled"``).
"""

from __future__ import annotations

import collections
import math

from cpmjax.serve.engine import pow2_bucket


LEAD = 1.25  # pace ratio above which re-tries of the slower kind back off
BUDGET_CAP = 4  # a budgeted re-try interval is at most this many times max_retry_every


class StepCostPolicy:
    """Measured choice among ``kinds`` step kinds (indices 0..kinds-1).

    ``probes``: steps of each kind before choosing; ``window``: recent steps a kind's pace is
    measured over; ``retry_every``: steps between re-tries of the kind measured longest ago, first
    interval (it doubles while a re-try leaves the choice unchanged and the choice leads the
    re-tried kind by ``LEAD``, up to ``max_retry_every``). ``budget``: the largest fraction of
    the chosen kind's time the next re-try's measured extra cost may take (it lengthens the
    interval, to at most ``BUDGET_CAP`` x ``max_retry_every`` steps); None: no budget."""

    def __init__(self, kinds: int, probes: int = 2, window: int = 16, retry_every: int = 64,
                 max_retry_every: int = 512, budget: float | None = 0.01):
        if kinds < 1 or probes < 1 or window < 1 or retry_every < 1:
            raise ValueError("kinds, probes, window and retry_every must be >= 1")
        if max_retry_every < retry_every:
            raise ValueError(f"max_retry_every must be >= retry_every ({retry_every}), got "
                             f"{max_retry_every}")
        if budget is not None and not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1] or None, got {budget!r}")
        self.kinds, self.probes, self.budget = kinds, probes, budget
        self.retry_every, self.max_retry_every = retry_every, max_retry_every
        self._seconds: dict[tuple[int, int], collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=window))
        self._tokens: dict[tuple[int, int], collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=window))
        self._steps: collections.Counter[int] = collections.Counter()
        self._measured_at: dict[tuple[int, int], int] = {}  # (kind, bucket): bucket's step
        self._retry: dict[int, tuple[int, int, int]] = {}  # bucket: (next step, interval, best)
        self.chosen: collections.Counter[int] = collections.Counter()

    def choose(self, busy: int) -> int:
        """The step kind for a step over ``busy`` busy slots."""
        b = _bucket(busy)
        self._steps[b] += 1
        for kind in range(self.kinds):  # a probe: too few of its own steps or of its tokens
            if min(len(self._seconds[kind, b]), len(self._tokens[kind, b])) < self.probes:
                return self._pick(kind)
        best = max(range(self.kinds), key=lambda k: self.rate(k, busy))
        others = [k for k in range(self.kinds) if k != best]
        if not others:
            return self._pick(best)
        kind = min(others, key=lambda k: self._measured_at.get((k, b), -1))
        if b not in self._retry:  # the first re-try's schedule (not recomputed every step)
            first = self._steps[b] + max(self.retry_every, self._affordable(kind, best, b))
            self._retry[b] = (first, self.retry_every, best)
        due, interval, last_best = self._retry[b]
        if self._steps[b] < due:
            return self._pick(best)
        # back off only from a kind the choice clearly beats (plain at batch 8 on this CPU
        # beats a tree round 3x, and each re-try costs); a close contender (chain vs tree at
        # batch 1, where acceptance varies by request) keeps being re-tried at the base interval
        clear_lead = self.rate(best, busy) >= LEAD * self.rate(kind, busy)
        interval = (min(2 * interval, self.max_retry_every) if best == last_best and clear_lead
                    else self.retry_every)
        # the kind re-tried next is the other one measured longest ago, once this one is fresh
        rest = [k for k in others if k != kind] or [kind]
        after = min(rest, key=lambda k: self._measured_at.get((k, b), -1))
        self._retry[b] = (self._steps[b] + max(interval, self._affordable(after, best, b)),
                          interval, best)
        # its tokens re-measured from scratch, as a probe: its old steps ran on other requests,
        # whose acceptance differs (a stale window from a hard prompt kept plain steps at batch
        # 1); its seconds, which depend on the kind and the batch size, keep their window (a
        # two-step estimate of each of several re-tried kinds' cost, on this noisy host, let
        # the luckiest of them displace a faster choice)
        self._tokens[kind, b].clear()
        return self._pick(kind)

    def rate(self, kind: int, busy: int) -> float:
        """Measured pace of ``kind`` at this batch-size bucket in tokens per second (0: not
        measured): its mean tokens per step over its mean seconds per step."""
        b = _bucket(busy)
        sec, tok = self._seconds[kind, b], self._tokens[kind, b]
        if not sec or not tok:
            return 0.0
        return (sum(tok) / len(tok)) / max(sum(sec) / len(sec), 1e-9)

    def record(self, kind: int, busy: int, seconds: float, slowest_row_tokens: int,
               paired: dict[int, int] | None = None) -> None:
        """One step of ``kind`` over ``busy`` slots took ``seconds``, and its busy row with the
        fewest new tokens got ``slowest_row_tokens``. ``paired``: for other kinds, the slowest
        row's tokens they would have emitted in this step (known without running them: a tree
        round shows what the chain of its first children accepts), added to their token
        windows only, so their pace compares on the same requests and positions."""
        b = _bucket(busy)
        self._seconds[kind, b].append(seconds)
        self._tokens[kind, b].append(max(busy, 1) * slowest_row_tokens)
        self._measured_at[kind, b] = self._steps[b]
        for other, tokens in (paired or {}).items():
            self._tokens[other, b].append(max(busy, 1) * tokens)

    def _affordable(self, kind: int, best: int, b: int) -> int:
        """Steps of ``best`` whose time a re-try of ``kind`` (a cold step and ``probes``
        measured ones, each its measured extra seconds over ``best``'s) fits within ``budget``
        of; 0 without a budget, or where ``best`` leads ``kind``'s pace by less than ``LEAD``."""
        if self.budget is None or not self._seconds[kind, b] or not self._seconds[best, b]:
            return 0
        # a close contender is no cost to re-try (at batch 1 a re-try of the chain while plain
        # steps run is how a choice misled by two noisy probes is undone)
        if self.rate(best, b) < LEAD * self.rate(kind, b):  # a bucket is a busy count of itself
            return 0
        mean = {k: sum(self._seconds[k, b]) / len(self._seconds[k, b]) for k in (kind, best)}
        extra = (self.probes + 1) * max(mean[kind] - mean[best], 0.0)
        return min(math.ceil(extra / (self.budget * max(mean[best], 1e-9))),
                   BUDGET_CAP * self.max_retry_every)

    def _pick(self, kind: int) -> int:
        self.chosen[kind] += 1
        return kind


def _bucket(busy: int) -> int:
    return pow2_bucket(max(busy, 1), 1)
