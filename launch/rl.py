"""RL from the SFT model: ``python launch/rl.py --config=configs/rl_tiny.py``.

GRPO with DAPO's techniques and chunk-wise rollout on the serving engine (``cpmjax.rl``). Any
config field can be overridden (``--config.rl.chunk_tokens=0`` is vanilla rollout). The run
directory (``--workdir``, default ``runs/<config name>``) gets metrics.jsonl, TensorBoard events
and orbax checkpoints holding the replay buffer; rerunning the same command resumes (a different
config is refused; ``--new_run`` moves the old run aside).
``--results=bench/results/rl_tiny`` writes the held-out rewards and every step's metrics as
JSON and the reward curve as PNG.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cpmjax.config import ConfigError
from cpmjax.rl.report import write_report
from cpmjax.rl.trainer import train
from cpmjax.train.checkpoint import CheckpointSaveError, quiet_orbax_tracebacks
from cpmjax.train.rundir import RunDirError

_CONFIG = config_flags.DEFINE_config_file("config", None, "RL experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default runs/<config name>)")
_NEW_RUN = flags.DEFINE_bool("new_run", False, "move an earlier run in --workdir aside "
                             "(nothing is deleted) and start afresh")
_RESULTS = flags.DEFINE_string("results", "", "write <path>.json and <path>.png of the run")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/rl_tiny.py")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    quiet_orbax_tracebacks()
    workdir = _WORKDIR.value or f"runs/{cfg.name}"
    try:
        train(cfg, workdir, new_run=_NEW_RUN.value)
    except (ConfigError, RunDirError, CheckpointSaveError) as e:
        print(f"rl: error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, CheckpointSaveError):  # don't wait for the failed save's writer threads
            os._exit(1)
        sys.exit(1)
    if _RESULTS.value:
        summary = write_report(workdir, _RESULTS.value, {"config": cfg.to_dict()})
        print(f"held-out reward {summary['start_eval_reward']:.3f} (step "
              f"{summary['start_step']}) -> {summary['final_eval_reward']:.3f} (step "
              f"{summary['final_step']}); written to {_RESULTS.value}.json/.png", flush=True)


if __name__ == "__main__":
    app.run(main)
