"""Weight-only quantization (MiniCPM4 report §4.1.2): int8/int4 symmetric group-wise RTN, GPTQ and P-GPTQ, and
a forward pass whose matmuls read the packed weights (:mod:`cpmjax.quant.qlinear`)."""

from cpmjax.quant.gptq import accumulate_hessians, gptq_quantize
from cpmjax.quant.packing import dequantize, pack_int4, quantize_rtn, unpack_int4
from cpmjax.quant.qforward import qforward, quantize_params

__all__ = ["dequantize", "accumulate_hessians", "gptq_quantize", "pack_int4", "qforward",
           "quantize_params", "quantize_rtn", "unpack_int4"]
