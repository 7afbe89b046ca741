"""Ternary QAT step-time benchmark: ``python launch/bench.py qat``.

Times the tiny and small train steps with and without BitCPM's ternary weight quantizer
(``cpmjax.quant.ternary``, group 128, every decoder linear), side by side in one process, the
two alternating round by round, and appends JSON lines to ``bench/results/qat_<platform>.jsonl``
(``ratio`` = QAT / fp step time; the goal is <= 1.05, BitCPM-CANN reports 1.045 on Ascend).
"""

from __future__ import annotations

import json
import os
import time

import jax

from cpmjax import presets
from cpmjax.bench.common import RESULTS
from cpmjax.config import ModelConfig
from cpmjax.quant.ternary import TernaryConfig
from cpmjax.quant.ternary_eval import step_time_overhead
from cpmjax.train.experiment import experiment_config


def run(configs: tuple[str, ...] = ("tiny", "small"), batch: int = 16, seq: int = 256,
        rounds: int = 7) -> list[dict]:
    device = jax.devices()[0]
    rows = []
    for name in configs:
        exp = experiment_config(getattr(presets, name)(), name)
        cfg = ModelConfig.from_hf_config(exp.model.to_dict())
        r = step_time_overhead(cfg, exp.train, TernaryConfig(group_size=128), batch=batch,
                               seq=seq, rounds=rounds)
        rows.append({"device": f"{device.platform}:{device.device_kind} ({os.cpu_count()} cpu, "
                               "shared machine)", "config": name, "batch": batch,
                     "seq_len": seq, "rounds": rounds, "jax": jax.__version__,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "metric": "qat_step_time_s", "value": r["qat_step_s"],
                     "baseline": r["fp_step_s"], "ratio": r["qat_step_s"] / r["fp_step_s"],
                     "higher_is_better": False, "per_round_ratio": r["per_round_ratio"]})
        print(f"{name}: fp {r['fp_step_s'] * 1e3:.1f} ms, QAT {r['qat_step_s'] * 1e3:.1f} ms, "
              f"overhead {r['overhead']:+.1%}")
    path = RESULTS / f"qat_{device.platform}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    run()
