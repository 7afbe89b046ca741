"""muP coordinate check (launch/mup_check.py): flat in width under muP, growing under SP.

Thresholds from theory, not fitted: under muP every coordinate is Theta(1) in width, so its
log-log slope vs width is 0 up to finite-width noise of relative size O(1/sqrt(width)); 0.2 over a
16x width range allows a 1.7x drift. Under SP with a fixed init std (0.1, HF practice) each hidden
matmul multiplies the RMS by ~std*sqrt(fan_in), so a block's output grows at least like
sqrt(width) (slope >= 0.5) and Adam updates at a width-independent LR add a width^1 term; 0.4
leaves room below the 0.5 floor.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "launch" / "mup_check.py"


@pytest.fixture(scope="module")
def result():
    spec = importlib.util.spec_from_file_location("mup_check", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.coord_check([64, 128, 256, 512], steps=4, lr=1e-2)


def test_mup_residual_stream_flat(result):
    for k in ("block1", "block2"):
        assert abs(result["mup"]["slope_last"][k]) < 0.2, result["mup"]["slope_last"]


def test_standard_residual_stream_grows(result):
    assert result["standard"]["slope_last"]["block2"] > 0.4, result["standard"]["slope_last"]
