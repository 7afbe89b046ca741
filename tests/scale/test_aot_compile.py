"""The 0.5B train step compiles ahead of time for a small TPU topology (libtpu's compiler)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_0p5b_step_compiles_for_v5e_2x2():
    path = pathlib.Path(__file__).resolve().parents[2] / "launch" / "aot_compile.py"
    spec = importlib.util.spec_from_file_location("aot_compile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    compiled = mod.compile_train_step("minicpm4_0p5b", "v5e:2x2", (1, -1, 1), 1024)
    mem = compiled.memory_analysis()
    # fp32 params + two Adam moments of ~0.5B params sharded 4 ways: > 1 GiB of arguments each.
    assert mem.argument_size_in_bytes > 2**30
    assert mem.temp_size_in_bytes > 0
