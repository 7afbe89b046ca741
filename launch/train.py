"""Train a MiniCPM4 model: ``python launch/train.py --config=configs/tiny.py``.

Any config field can be overridden, e.g. ``--config.train.steps=200 --config.mesh.tensor=2``.
The run directory (``--workdir``, default ``runs/<config name>``) receives metrics.jsonl,
TensorBoard events, orbax checkpoints and config.json; rerunning the same command resumes.
"""

from __future__ import annotations


from absl import app, flags, logging
from ml_collections import config_flags

from cpmjax.train.distributed import initialize_distributed
from cpmjax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default runs/<config name>)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    initialize_distributed()
    final = train(cfg, _WORKDIR.value or f"runs/{cfg.name}")
    loss, base = final.get("eval_loss"), final["unigram_loss"]
    if loss is not None:
        print(f"final held-out loss {loss:.4f} vs unigram baseline {base:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
