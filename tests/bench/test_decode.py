"""The quantized-weight decode benchmark runs each packed format through the serving engine and
reports it against float32 weights measured in the same process."""
from __future__ import annotations

import math

from cpmjax.bench.decode import Timing, interleaved, run_quantized, run_tree


def test_decode_quant_rows_cover_every_format_relative_to_float32():
    rows = run_quantized(presets_=("tiny",), batches=(1,), requests=2, prompt_len=16,
                         new_tokens=8, write=False)
    assert [r["weights_format"] for r in rows] == ["float32", "int8", "int4", "ternary"]
    assert rows[0]["decode_ratio_vs_float32"] == 1.0
    for r in rows:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["decode_tokens_per_s"])
        assert math.isclose(r["decode_ratio_vs_float32"],
                            r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"])


def test_interleaved_passes_run_round_robin_and_keep_every_timing():
    order = []

    def pass_of(name):
        def once():
            order.append(name)
            return Timing(1.0, 10, 0.5, 8)
        return once

    timings = interleaved([pass_of("a"), pass_of("b"), pass_of("c")], repeats=3)
    assert order == ["a", "b", "c"] * 3
    assert [len(t) for t in timings] == [3, 3, 3]


def test_decode_tree_rows_compare_every_variant_with_plain_decoding():
    rows = run_tree(batches=(1,), requests=2, prompt_len=16, new_tokens=8, trees=((2, 2, 3),),
                    repeats=2, write=False)
    names = [(r["impl"], r["decoding"]) for r in rows]
    assert names == [("cpmjax", "plain"), ("cpmjax", "chain k=3"), ("cpmjax", "tree (2, 2, 3)"),
                     ("cpmjax", "tree (2, 2, 3) measured"), ("hf_transformers", "plain"),
                     ("cpmjax", "plain"), ("cpmjax", "chain k=3"),
                     ("cpmjax", "tree (2, 2, 3)"), ("cpmjax", "tree (2, 2, 3) measured")]
    plain = rows[0]
    for r in rows[:5]:
        assert math.isclose(r["decode_speedup_vs_plain"],
                            r["decode_tokens_per_s"] / plain["decode_tokens_per_s"])
        assert math.isclose(r["median_speedup_vs_plain"], r["decode_tokens_per_s_median"]
                            / plain["decode_tokens_per_s_median"])
        assert r["passes"] == 2 and r["timing"] == "interleaved"
    assert rows[5]["weights_format"] == "int4" and rows[5]["decode_speedup_vs_plain"] == 1.0
    assert all(r["mean_accept_length"] >= 1.0 for r in rows)
