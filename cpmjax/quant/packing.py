"""Symmetric group-wise integer weights and their packing.

Convention (GPTQ ``sym=True``, the checkpoint layout CPM.cu's ``gptq2marlin.py`` converts to
Marlin: bits=4, sym, group_size=128, desc_act=False, static groups; CPM.cu gptq2marlin.py): for a weight
``w [in, out]`` and each group of ``group_size`` consecutive input rows and each output column,
``scale = 2 * absmax / (2**bits - 1)``, ``q = clip(round(w / scale), -2**(bits-1), 2**(bits-1)-1)``,
``w ≈ q * scale``. Hence ``|w - q*scale| <= scale / 2`` everywhere.

Packing: int8 is stored as int8 ``[in, out]``. int4 is stored GPTQ-style as int32
``[in/8, out]``: the 8 consecutive input rows ``8j..8j+7`` of a column go to word ``j``, row
``8j+r`` in bits ``4r..4r+3`` (low nibble first), each as the unsigned nibble ``q + 8``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

QTensor = dict[str, Any]  # {"qweight": packed ints, "scales": [in/group, out] float32}


def check_bits_group(bits: int, group_size: int, n_in: int) -> None:
    """Reject layouts the format does not define, naming the offending value."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size <= 0 or n_in % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide the input dim {n_in}")
    if bits == 4 and group_size % 8:
        raise ValueError(f"int4 packs 8 rows per int32, so group_size must be a multiple of 8, "
                         f"got {group_size}")


def group_scales(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """``[in/group, out]`` float32 scales of ``w [in, out]`` (an all-zero group gets scale 1)."""
    n_in, n_out = w.shape
    absmax = np.abs(w.reshape(n_in // group_size, group_size, n_out)).max(axis=1)
    scale = 2.0 * absmax / (2 ** bits - 1)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def quantize_with_scales(w: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Signed integer codes (int32 values in range) of ``w`` rows given per-row ``scales``.

    The ratio is rounded in float32 whatever the input precision: -absmax/scale is exactly the tie
    -(2**bits - 1)/2 by construction, and float64 GPTQ must break it like float32 RTN does."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return np.clip(np.round((w / scales).astype(np.float32)), lo, hi).astype(np.int32)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed int4 codes ``[in, out]`` -> int32 ``[in/8, out]`` (layout in the module doc)."""
    n_in, n_out = q.shape
    u = (q.astype(np.int64) + 8).astype(np.uint32).reshape(n_in // 8, 8, n_out)
    words = np.zeros((n_in // 8, n_out), np.uint32)
    for r in range(8):
        words |= u[:, r] << np.uint32(4 * r)
    return words.view(np.int32)


def unpack_int4(words: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_int4` in jax (runs inside jit): int32 ``[..., in/8, out]`` ->
    int32 codes ``[..., in, out]``."""
    shifts = (4 * jnp.arange(8, dtype=jnp.int32))[:, None]
    nib = (words[..., :, None, :] >> shifts) & 15
    return nib.reshape(*words.shape[:-2], words.shape[-2] * 8, words.shape[-1]) - 8


def pack(q: np.ndarray, scales: np.ndarray, bits: int) -> QTensor:
    return {"qweight": pack_int4(q) if bits == 4 else q.astype(np.int8),
            "scales": np.asarray(scales, np.float32)}


def quantize_rtn(w: Any, bits: int = 4, group_size: int = 128) -> QTensor:
    """Round-to-nearest quantization of a 2-D ``[in, out]`` weight."""
    w = np.asarray(w, np.float32)
    check_bits_group(bits, group_size, w.shape[0])
    scales = group_scales(w, bits, group_size)
    q = quantize_with_scales(w, np.repeat(scales, group_size, axis=0), bits)
    return pack(q, scales, bits)


def dequantize(qt: QTensor, dtype: Any = jnp.float32) -> jax.Array:
    """``[..., in, out]`` weights from a packed tensor (int4 if ``qweight`` is int32, ternary
    if it is uint8: :mod:`cpmjax.quant.ternary`)."""
    if np.dtype(qt["qweight"].dtype) == np.uint8:
        from cpmjax.quant.ternary import dequantize_packed  # ternary builds on this module

        return dequantize_packed(qt, dtype)
    qw, scales = qt["qweight"], jnp.asarray(qt["scales"])
    q = unpack_int4(jnp.asarray(qw)) if qw.dtype == jnp.int32 else jnp.asarray(qw, jnp.int32)
    group = q.shape[-2] // scales.shape[-2]
    return (q.astype(jnp.float32) * jnp.repeat(scales, group, axis=-2)).astype(dtype)
