"""GPTQ (Frantar et al. 2022, arXiv:2210.17323, Alg. 1) and P-GPTQ (MiniCPM4 report, arXiv 2506.07900 §4.1.2).

GPTQ quantizes one input row of ``w [in, out]`` at a time and spreads its rounding error over the
rows not yet quantized, weighted by the inverse Hessian ``H = XᵀX / N`` of the layer's inputs X
(Cholesky factor of H⁻¹, dampened by ``damp * mean(diag H)``, processed in blocks). Scales are
fixed up front from the original weights (static groups, as Marlin requires), so the result uses
exactly the RTN format of :mod:`cpmjax.quant.packing`.

P-GPTQ: the first tokens of a sequence have activations ~10x larger and dominate H, so their
positions (``position < skip``, skip = 4) are dropped from H.

Calibration streams (:func:`accumulate_hessians`): a layer runs on one calibration batch at a
time and only that batch's linear inputs exist at once; their Gram matrices are summed in
float64 and divided by the token count at the end, which gives the same H as one call over all
rows. What stays resident is one ``[rows, T, d]`` hidden state per batch (the layer inputs) and
the four ``[in, in]`` Hessians; :func:`calibration_bytes` counts it.
"""

from __future__ import annotations

from typing import Any

import functools
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model.params import Params
from cpmjax.model.rope import rope_cos_sin
from cpmjax.model.transformer import decoder_layer
from cpmjax.quant.packing import QTensor, check_bits_group, group_scales, pack, quantize_with_scales

# weight -> (tap holding its input, number of leading input dims in its cpmjax shape)
LINEAR_INPUTS = {"wq": ("attn_in", 1), "wk": ("attn_in", 1), "wv": ("attn_in", 1),
                 "wo": ("wo_in", 2), "w_gate": ("mlp_in", 1), "w_up": ("mlp_in", 1),
                 "w_down": ("down_in", 1)}


def gptq_quantize(w: Any, hessian: Any, bits: int = 4, group_size: int = 128,
                  damp: float = 0.01, block: int = 128) -> QTensor:
    """GPTQ of a 2-D weight ``[in, out]`` given ``hessian [in, in]`` of its inputs."""
    W = np.asarray(w, np.float32).astype(np.float64).T.copy()  # [out, in]; f32 values as RTN
    H = np.asarray(hessian, np.float64).copy()
    n_in = W.shape[1]
    check_bits_group(bits, group_size, n_in)
    if H.shape != (n_in, n_in):
        raise ValueError(f"hessian shape {H.shape} does not match the input dim {n_in}")
    scales = group_scales(np.asarray(w, np.float32), bits, group_size)
    dead = np.diag(H) == 0  # inputs never active: any value is exact
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(n_in)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
    row_scale = np.repeat(scales, group_size, axis=0).astype(np.float64)  # [in, out]
    Q = np.zeros_like(W, dtype=np.int32)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
        E1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            s = row_scale[i1 + i]
            q = quantize_with_scales(W1[:, i], s, bits)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q * s) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return pack(Q.T, scales, bits)


class CalibBatch(NamedTuple):
    """One calibration batch as it enters a decoder layer."""

    hidden: jax.Array  # [B, T, d]
    positions: jax.Array  # [B, T]
    segment_ids: jax.Array | None


def _run_layer(batch: CalibBatch, layer: Params, cfg: ModelConfig,
               taps: dict[str, jax.Array] | None = None) -> jax.Array:
    cos, sin = rope_cos_sin(cfg, jnp.maximum(batch.positions, 0))
    return decoder_layer(batch.hidden, layer, cfg, cos=cos, sin=sin, positions=batch.positions,
                         segment_ids=batch.segment_ids, cache_kv=None, taps=taps)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "skip"))
def _layer_grams(batch: CalibBatch, layer: Params, cfg: ModelConfig, skip: int
                 ) -> tuple[dict[str, jax.Array], jax.Array]:
    """(XᵀX summed over kept tokens, per tap; kept-token count) of one batch."""
    taps: dict[str, jax.Array] = {}
    _run_layer(batch, layer, cfg, taps)
    keep = (batch.positions >= skip).astype(jnp.float32).reshape(-1, 1)
    grams = {}
    for name, x in taps.items():
        x = x.reshape(-1, int(np.prod(x.shape[2:]))).astype(jnp.float32) * keep
        grams[name] = x.T @ x
    return grams, jnp.sum(keep)


_layer_output = jax.jit(_run_layer, static_argnames=("cfg",))


def accumulate_hessians(batches: Iterable[CalibBatch], layer: Params, cfg: ModelConfig,
                        skip: int = 0) -> dict[str, np.ndarray]:
    """H per tap ``[in, in]`` (float64) of one decoder layer over calibration batches, one batch
    at a time. Tokens at ``position < skip`` are left out of every H (P-GPTQ with skip=4)."""
    sums: dict[str, np.ndarray] = {}
    count = 0.0
    for batch in batches:
        grams, n = _layer_grams(batch, layer, cfg, skip)
        count += float(n)
        for name, g in grams.items():
            g = np.asarray(g, np.float64)
            sums[name] = g if name not in sums else sums[name] + g
    if not sums:
        raise ValueError("GPTQ needs at least one calibration batch")
    return {name: g / max(count, 1.0) for name, g in sums.items()}


def layer_outputs(batches: Iterable[CalibBatch], layer: Params, cfg: ModelConfig
                  ) -> list[CalibBatch]:
    """The batches after one decoder layer (the next layer's calibration inputs)."""
    return [b._replace(hidden=_layer_output(b, layer, cfg)) for b in batches]


def calibration_bytes(cfg: ModelConfig, rows: int, seq_len: int, batch_rows: int
                      ) -> dict[str, int]:
    """Resident bytes of streaming calibration, by part: the float64 Hessians of one layer, the
    float32 hidden states of every calibration row, one batch's float32 linear inputs, and one
    layer's float32 weights. An estimate (XLA's temporaries inside one layer call come on top)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    attn = cfg.num_attention_heads * cfg.head_dim
    hessians = 8 * (2 * d * d + attn * attn + i * i)
    q = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    layer = 4 * (d * q + attn * d + 3 * d * i + 2 * d)
    return {"hessians": hessians, "hidden_states": 4 * rows * seq_len * d,
            "batch_inputs": 4 * batch_rows * seq_len * (2 * d + attn + i),
            "layer_weights": layer}
