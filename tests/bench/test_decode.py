"""The quantized-weight decode benchmark runs each packed format through the serving engine and
reports it against float32 weights measured in the same process."""
from __future__ import annotations

import math

from cpmjax.bench.decode import run_quantized


def test_decode_quant_rows_cover_every_format_relative_to_float32():
    rows = run_quantized(presets_=("tiny",), batches=(1,), requests=2, prompt_len=16,
                         new_tokens=8, write=False)
    assert [r["weights_format"] for r in rows] == ["float32", "int8", "int4", "ternary"]
    assert rows[0]["decode_ratio_vs_float32"] == 1.0
    for r in rows:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["decode_tokens_per_s"])
        assert math.isclose(r["decode_ratio_vs_float32"],
                            r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"])
