"""Which decode-step kind to run, from the engine's own measured step costs.

Speculation pays when a round's extra tokens outweigh its extra compute: at batch 1 on a
memory-bound device a tree round costs little more than a plain step, while on a saturated
device (this CPU at batch 8) verifying a 17-node tree per row costs several plain steps. vLLM
turns speculation off above a batch size, and EAGLE-3/-4-style length selection picks the draft
length from measured acceptance; here the choice is made from measurements alone: for each
batch-size bucket, the expected tokens per second of each step kind (mean tokens per busy row
over mean seconds, over a window of recent steps), each kind tried a few times first and
re-tried now and then so that drifting costs (a context growing) are seen.

The choice changes speed only: the engine's steps emit the same tokens whichever kind runs
(``cpmjax.serve.tree``, rule ``"coupled"``).
"""

from __future__ import annotations

import collections

from cpmjax.serve.engine import pow2_bucket


class StepCostPolicy:
    """Measured choice among ``kinds`` step kinds (indices 0..kinds-1)."""

    def __init__(self, kinds: int, probes: int = 2, window: int = 16, retry_every: int = 64):
        if kinds < 1 or probes < 1 or window < 1 or retry_every < 1:
            raise ValueError("kinds, probes, window and retry_every must be >= 1")
        self.kinds, self.probes, self.retry_every = kinds, probes, retry_every
        self._seconds: dict[tuple[int, int], collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=window))
        self._tokens: dict[tuple[int, int], collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=window))
        self._steps: collections.Counter[int] = collections.Counter()
        self.chosen: collections.Counter[int] = collections.Counter()

    def choose(self, busy: int) -> int:
        """The step kind for a step over ``busy`` busy slots."""
        b = pow2_bucket(max(busy, 1), 1)
        self._steps[b] += 1
        for kind in range(self.kinds):
            if len(self._seconds[kind, b]) < self.probes:
                return self._pick(kind)
        if self._steps[b] % self.retry_every == 0:  # the kind measured longest ago, once
            return self._pick((self._steps[b] // self.retry_every) % self.kinds)
        return self._pick(max(range(self.kinds), key=lambda k: self.rate(k, busy)))

    def rate(self, kind: int, busy: int) -> float:
        """Measured tokens per second of ``kind`` at this batch-size bucket (0: not measured)."""
        b = pow2_bucket(max(busy, 1), 1)
        sec, tok = self._seconds[kind, b], self._tokens[kind, b]
        return 0.0 if not sec else sum(tok) / max(sum(sec), 1e-9)

    def record(self, kind: int, busy: int, seconds: float, tokens: int) -> None:
        """One step of ``kind`` over ``busy`` slots took ``seconds`` and emitted ``tokens``."""
        b = pow2_bucket(max(busy, 1), 1)
        self._seconds[kind, b].append(seconds)
        self._tokens[kind, b].append(tokens)

    def _pick(self, kind: int) -> int:
        self.chosen[kind] += 1
        return kind
