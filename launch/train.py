"""Train a MiniCPM4 model: ``python launch/train.py --config=configs/tiny.py``.

Any config field can be overridden, e.g. ``--config.train.steps=200 --config.mesh.tensor=2``.
The run directory (``--workdir``, default ``runs/<config name>``; ``gs://`` URLs work) receives
metrics.jsonl, TensorBoard events, orbax checkpoints, config.json and a copy of the tokenizer;
rerunning the same command resumes. A workdir holding a run with another config is refused unless
``--new_run``, which moves the old run to ``<workdir>.prev-<time>`` first. Errors a user can act on
(a bad config field, a locked workdir, a full disk, a non-finite run) end the run with one line on
stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from cpmjax.config import ConfigError
from cpmjax.data import DataError
from cpmjax.train.checkpoint import CheckpointSaveError, quiet_orbax_tracebacks
from cpmjax.train.distributed import initialize_distributed
from cpmjax.train.loop import NonFiniteError, train
from cpmjax.train.rundir import RunDirError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default runs/<config name>)")
_NEW_RUN = flags.DEFINE_bool("new_run", False, "start a new run in --workdir even if it holds one "
                             "(with another config): the old run is moved aside, not deleted")
_USER_ERRORS = (ConfigError, DataError, RunDirError, CheckpointSaveError, NonFiniteError)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    quiet_orbax_tracebacks()
    warnings.formatwarning = lambda message, category, *_: f"{category.__name__}: {message}\n"
    initialize_distributed()
    try:
        final = train(cfg, _WORKDIR.value or f"runs/{cfg.name}", new_run=_NEW_RUN.value)
    except _USER_ERRORS as e:
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, CheckpointSaveError):  # don't wait for the failed save's writer threads
            os._exit(1)
        sys.exit(1)
    loss, base = final.get("eval_loss"), final["unigram_loss"]
    if loss is not None:
        print(f"final held-out loss {loss:.4f} vs unigram baseline {base:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
