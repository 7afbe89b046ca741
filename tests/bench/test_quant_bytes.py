"""Packed weights cut the bytes a TPU decode step reads (libtpu's ahead-of-time compiler on this
CPU host, one v5p chip): one int4 linear (the 8B gate projection) reads its packed codes and
scales only, and a 0.5B decoder layer with int4 or ternary linears reads a fraction of its bf16
bytes.

Not asserted on CPU: XLA CPU runs dots as library calls on materialised operands, so there the
dequantized weight is written and read back whichever form the matmul takes (and a bf16 weight
is upcast to float32 likewise); the CPU rows in bench/results/quant_bytes.jsonl show it.
"""

from __future__ import annotations

import importlib.util

import pytest

from cpmjax.bench import quant_bytes
from cpmjax.presets import model_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed")
TOPOLOGY = "v5p:2x2x1"


def test_int4_and_ternary_decode_linears_read_the_packed_bytes():
    bf16 = quant_bytes.linear_bytes(4096, 16384, 1, "bf16", TOPOLOGY)
    int4 = quant_bytes.linear_bytes(4096, 16384, 1, "int4", TOPOLOGY)
    ternary = quant_bytes.linear_bytes(4096, 16384, 1, "ternary", TOPOLOGY)
    # int4 codes are 1/4 of bf16, group-128 float32 scales 1/64 more: 0.27 if nothing else moves
    assert int4.accessed < 0.3 * bf16.accessed
    assert ternary.accessed < 0.2 * bf16.accessed  # 1/8 + 1/64


def test_quantized_decode_layer_reads_a_fraction_of_the_bf16_bytes():
    cfg = model_config("minicpm4_0p5b")
    bf16 = quant_bytes.layer_decode_bytes(cfg, "bf16", TOPOLOGY)
    int4 = quant_bytes.layer_decode_bytes(cfg, "int4", TOPOLOGY)
    ternary = quant_bytes.layer_decode_bytes(cfg, "ternary", TOPOLOGY)
    dequantized_first = quant_bytes.layer_decode_bytes(cfg, "ternary", TOPOLOGY, fused=False)
    assert int4.accessed < 0.5 * bf16.accessed and int4.read < 0.4 * bf16.read
    assert ternary.accessed < 0.5 * bf16.accessed and ternary.read < 0.35 * bf16.read
    assert ternary.accessed < 0.3 * dequantized_first.accessed  # the dense ternary layer


def test_int4_8b_decode_layer_reads_under_0p3x_of_bf16_counting_each_weight_once():
    """Without the alternate-memory prefetch, which cost analysis counts as a second read of a
    weight, the bf16 layer accesses about its weight bytes and int4 at most 0.3x of them."""
    cfg = model_config("minicpm4_8b")
    bf16 = quant_bytes.layer_decode_bytes(cfg, "bf16", TOPOLOGY, prefetch=False)
    int4 = quant_bytes.layer_decode_bytes(cfg, "int4", TOPOLOGY, prefetch=False)
    assert bf16.accessed == pytest.approx(quant_bytes.weight_bytes(cfg, "bf16"), rel=0.02)
    assert int4.accessed < 0.3 * bf16.accessed
    assert int4.accessed > quant_bytes.weight_bytes(cfg, "int4")  # codes and scales, read once
    with pytest.raises(ValueError, match="pass a topology"):
        quant_bytes.layer_decode_bytes(cfg, "int4", prefetch=False)
