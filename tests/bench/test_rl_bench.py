"""The RL rollout benchmark's settings build valid RL configs that differ only in rollout."""

from __future__ import annotations

import pytest

from cpmjax.bench import rl as rl_bench
from cpmjax.rl.config import check_rl_config


@pytest.mark.parametrize("setting", sorted(rl_bench.SETTINGS))
def test_settings_give_valid_configs_differing_only_in_chunking(setting: str) -> None:
    model, families, temperature = rl_bench.SETTINGS[setting]
    chunk = rl_bench.bench_config(16, model, 4, families, temperature)
    vanilla = rl_bench.bench_config(0, model, 4, families, temperature)
    for cfg in (chunk, vanilla):
        check_rl_config(cfg)
        assert cfg.train.init_from == model and cfg.rl.temperature == temperature
    assert chunk.rl.chunk_tokens == 16 and vanilla.rl.chunk_tokens == 0
    vanilla.rl.chunk_tokens = 16
    assert vanilla.to_dict() == chunk.to_dict()


def test_the_long_tail_setting_samples_echo_at_temperature_one() -> None:
    _, families, temperature = rl_bench.SETTINGS["longtail"]
    assert "echo" in families.split(",") and temperature == 1.0


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="setting must be one of"):
        rl_bench.run(setting="cold", write=False)
