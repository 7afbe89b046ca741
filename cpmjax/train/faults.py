"""Fault injection for the checkpointer's save path, so tests can stop a real trainer at an exact
point of a save instead of racing a timer.

``CPMJAX_FAULT=POINT@STEP[,POINT@STEP...]`` (read once, by ``TrainCheckpointer``) acts when the
save of training step STEP reaches POINT:

- ``before_write``: SIGKILL before orbax is asked to write anything of the step;
- ``mid_write``: SIGKILL while orbax's background write is in flight (the step's temporary
  folder exists; its commit is held back so the kill always lands before it);
- ``before_commit``: SIGKILL once every file is written, before orbax commits (renames) the step;
- ``after_commit``: SIGKILL after the commit, before the step's seal is written;
- ``after_seal``: SIGKILL right after the seal is written;
- ``enospc``: the write fails with ``OSError(ENOSPC)`` just before the commit, as a full disk
  makes it fail (the error reaches the trainer the way orbax's own write errors do).

Nothing reads the variable outside the save path; unset, every hook is a no-op.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

ENV = "CPMJAX_FAULT"
KILL_POINTS = ("before_write", "mid_write", "before_commit", "after_commit", "after_seal")
POINTS = KILL_POINTS + ("enospc",)


class FaultPlan:
    """The faults requested through ``CPMJAX_FAULT``, as {point: step}."""

    def __init__(self, spec: str = "") -> None:
        self.faults: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            point, _, step = item.partition("@")
            if point not in POINTS or not step.isdigit():
                raise ValueError(f"{ENV}={spec!r}: {item!r} is not POINT@STEP with POINT one of "
                                 f"{', '.join(POINTS)}")
            self.faults[point] = int(step)

    @classmethod
    def from_env(cls) -> "FaultPlan":
        return cls(os.environ.get(ENV, ""))

    def wants(self, point: str, step: int) -> bool:
        return self.faults.get(point) == step

    def hit(self, point: str, step: int) -> None:
        """Act on ``point`` of the save of ``step`` if the plan says so."""
        if not self.wants(point, step):
            return
        if point == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({ENV}={point}@{step})")
        os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()  # SIGKILL is asynchronous; never run on past the fault point
