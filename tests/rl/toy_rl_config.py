"""The RL resume test's experiment config file (``launch/rl.py --config=...``)."""

from tests.rl.helpers import toy_config


def get_config():
    cfg = toy_config(group_size=4, groups_per_step=2, rollout_batch=12, chunk_tokens=5,
                     max_response=20, minibatches=2, kl_coef=0.01, ref_refresh_every=3)
    cfg.train.update(steps=7, eval_every=100)
    cfg.checkpoint.update(every=2, async_save=True)
    return cfg
