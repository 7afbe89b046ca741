"""Packed weights that the decoder's matmuls read as they are, dequantizing inside the matmul.

A :class:`QuantizedWeight` holds one linear's packed codes and scales (formats of
:mod:`cpmjax.quant.packing`, GPTQ arXiv 2210.17323, and :mod:`cpmjax.quant.ternary`, BitNet b1.58
arXiv 2402.17764) with its logical dense shape; ``cpmjax.model.layers.linear`` calls its
:meth:`~QuantizedWeight.matmul` instead of a dense dot, so each matmul chooses how its weight is
unpacked. Decode is bound by reading weights, and unpacking that XLA leaves outside the matmul
writes and re-reads a float weight, losing what the packed format saves (``dequantize_layer``
used to dequantize each layer to dense first: on TPU XLA still fused that into the matmuls for
int4 / int8, compiling the same decode layer as now, but not for ternary, whose 8B decode layer
read 2.27x the bf16 layer's bytes; ``bench/results/quant_bytes.jsonl``, ``fused: false`` rows).

Formulation, chosen by compiled cost analysis (``bytes accessed``) of one 4096 x 16384 linear
with bf16 activations ``[M, 4096]``, through libtpu's ahead-of-time compiler for a v5p chip,
relative to the same dot on a bf16 weight, at M = 1 / 16 / 2048 (``launch/quant_bytes.py``
rows with ``scope: linear``; the alternatives from one-off scripts of the same shape):

- int4 / int8: the dequantized operand ``(codes * scale).astype(dt)`` goes straight into the
  dot, and XLA TPU fuses the unpacking into the matmul's operand read: int4 0.267 / 0.276 /
  0.656, int8 0.516 / 0.520 / 0.772 (at M=1 the packed bytes plus scales, nothing more). The
  grouped-partial form (``einsum('mgk,gkn->mgn')`` on the codes, then scales, then a sum over
  groups) measured 4.36 / 6.28 / 3.98 (it writes the per-group products); int4 stored as
  ``jnp.int4`` (native s4) 0.28 at M=1 at best, no better than the GPTQ int32 words, which stay.
- ternary: the unpacked uint8 operand does not fuse (2.45 / 2.44 / 1.69). One dot per 2-bit
  position r of the bytes (input rows ``r::4`` against ``code_r * scale``) reads the packed
  bytes once at M=1 (0.156) but measured 1.29 at M=16 and 4.47 at M=2048; so it is used for
  ``M <= SUBROW_MAX_M`` and the dequantized operand above it. Ternary codes stored as int32 words
  of 16 (the int4 layout at 2 bits) measured 0.142 / 0.150 / 0.60, but converting the uint8
  format to them inside the step does not fuse (1.95 at M=1): that needs the serving params in
  that layout, a format change not made here.
- XLA CPU runs dots as library calls on materialised operands (and upcasts bf16 dots to float32),
  so on CPU the dequantized weight is written either way; there a quantized layer reads fewer
  bytes than a bf16 one only because the bf16 one is converted to float32 too.

qwix (Google's JAX quantization library; PyPI 0.1.8, not installed in this environment) quantizes
Flax modules by intercepting their dot_generals and has no three-level (ternary) type; this model
is plain functions over dicts whose packed layouts are fixed by GPTQ and BitCPM checkpoints, so
the matmul is written here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.quant.packing import dequantize
from cpmjax.quant.ternary import dequantize_codes

SUBROW_MAX_M = 16  # largest row count that takes the per-2-bit-position ternary dots


def _format(qweight: Any) -> str:
    return {np.dtype(np.int32): "int4", np.dtype(np.int8): "int8",
            np.dtype(np.uint8): "ternary"}[np.dtype(qweight.dtype)]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One packed linear inside the layer scan: ``qweight`` (int4: int32 ``[in/8, out]``, int8:
    int8 ``[in, out]``, ternary: uint8 ``[in/4, out]``), ``scales`` ``[groups, out]`` (ternary
    per tensor: ``[1, 1]``), the dense ``shape`` the model expects (e.g. ``wo``'s
    ``[heads, head_dim, d]``) and the compute ``dtype`` set by :meth:`astype`."""

    qweight: jax.Array
    scales: jax.Array
    shape: tuple[int, ...]
    dtype: Any = jnp.float32

    def tree_flatten(self) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, ...]]:
        return (self.qweight, self.scales), (self.shape, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], leaves: Any) -> "QuantizedWeight":
        return cls(*leaves, *aux)

    @property
    def format(self) -> str:
        """``"int4"``, ``"int8"`` or ``"ternary"`` (from the packed dtype, as ``dequantize``)."""
        return _format(self.qweight)

    def astype(self, dtype: Any) -> "QuantizedWeight":
        """The same packed weight computing in ``dtype`` (the model casts weights to its compute
        dtype before each matmul; the packed codes stay as they are)."""
        return dataclasses.replace(self, dtype=jnp.dtype(dtype))

    def dense(self, dtype: Any = None) -> jax.Array:
        """The dequantized weight in its logical shape (``dtype`` defaults to the compute one)."""
        w = dequantize({"qweight": self.qweight, "scales": self.scales}, jnp.float32)
        return w.reshape(self.shape).astype(self.dtype if dtype is None else dtype)

    def matmul(self, x: jax.Array, preferred_element_type: Any = None) -> jax.Array:
        """``x [M, in] @ W [in, out]`` (W flattened to 2-D) without a dense W in memory where
        the format allows (module doc); result in ``preferred_element_type`` or x's dtype."""
        k = x.shape[-1]
        out_dtype = preferred_element_type or x.dtype
        if self.format == "ternary" and x.shape[0] <= SUBROW_MAX_M and _subrow_ok(self, k):
            return _ternary_subrow_dots(x, self, out_dtype)
        w = self.dense().reshape(k, -1)
        return jnp.dot(x, w, preferred_element_type=preferred_element_type)


def _subrow_ok(w: QuantizedWeight, k: int) -> bool:
    """Whether each packed byte's four input rows share one scale group."""
    return (k // w.scales.shape[-2]) % 4 == 0


def _ternary_subrow_dots(x: jax.Array, w: QuantizedWeight, out_dtype: Any) -> jax.Array:
    """Sum over the 2-bit position r of ``x[:, r::4] @ (code_r * scale)``: each dot's operand is
    an elementwise function of the packed bytes, which XLA fuses into the matmul."""
    m, k = x.shape
    xr = x.reshape(m, k // 4, 4)
    acc = jnp.zeros((m, math.prod(w.shape) // k), jnp.float32)
    for r in range(4):
        codes = ((w.qweight >> jnp.uint8(2 * r)) & jnp.uint8(3)).astype(jnp.int8) - jnp.int8(1)
        wr = dequantize_codes(codes, w.scales, w.dtype)  # rows 4j+r share byte row j's group
        acc = acc + jnp.dot(xr[:, :, r], wr, preferred_element_type=jnp.float32)
    return acc.astype(out_dtype)


def quantized_weight(packed: dict[str, jax.Array], shape: tuple[int, ...],
                     dtype: Any = jnp.float32) -> QuantizedWeight:
    """A :class:`QuantizedWeight` of a packed ``{"qweight", "scales"}`` leaf of one layer."""
    return QuantizedWeight(packed["qweight"], packed["scales"], tuple(shape), jnp.dtype(dtype))
