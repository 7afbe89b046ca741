"""Run in a subprocess with 8 fake CPU devices: prints JSON with per-mesh losses and specs."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax  # noqa: E402

from cpmjax.parallel import make_mesh  # noqa: E402
from tests.train.helpers import batch, setup, step_fn  # noqa: E402


def losses(mesh, **step_kw) -> tuple[list[float], dict[str, str]]:
    cfg, mesh, sh, tx, state = setup(mesh=mesh)
    step = step_fn(cfg, tx, sh, mesh, (8, 32), **step_kw)
    out = []
    for i in range(3):
        state, m = step(state, batch(i, b=8))
        out.append(float(m["loss"]))
    specs = {jax.tree_util.keystr(p): list(s.spec) for p, s in
             jax.tree.leaves_with_path(sh)}
    return out, specs


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    devs = jax.devices()
    result = {}
    for name, kw in {"single": dict(devices=devs[:1]), "fsdp4_tensor2": dict(fsdp=4, tensor=2),
                     "data2_tensor4": dict(data=2, fsdp=1, tensor=4)}.items():
        result[name] = losses(make_mesh(**kw))
    # the Pallas attention kernel (interpret mode) per shard under shard_map: batch over fsdp,
    # KV heads over tensor
    result["fsdp4_tensor2_splash"] = losses(make_mesh(fsdp=4, tensor=2),
                                            attn_impl="splash_interpret")
    json.dump(result, sys.stdout)
