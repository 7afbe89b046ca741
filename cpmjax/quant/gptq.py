"""GPTQ (Frantar et al. 2022, arXiv:2210.17323, Alg. 1) and P-GPTQ (MiniCPM4 report, arXiv 2506.07900 §4.1.2).

GPTQ quantizes one input row of ``w [in, out]`` at a time and spreads its rounding error over the
rows not yet quantized, weighted by the inverse Hessian ``H = XᵀX / N`` of the layer's inputs X
(Cholesky factor of H⁻¹, dampened by ``damp * mean(diag H)``, processed in blocks). Scales are
fixed up front from the original weights (static groups, as Marlin requires), so the result uses
exactly the RTN format of :mod:`cpmjax.quant.packing`.

P-GPTQ: the first tokens of a sequence have activations ~10x larger and dominate H, so their
positions (``position < skip``, skip = 4) are dropped from H.
"""

from __future__ import annotations

from typing import Any

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


@jax.jit
def _gram(x: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * keep.reshape(-1, 1)
    return x.T @ x, jnp.sum(keep)


def layer_hessians(h: jax.Array, layer: Params, cfg: ModelConfig, positions: jax.Array,
                   segment_ids: jax.Array | None, skip: int = 0
                   ) -> tuple[dict[str, np.ndarray], jax.Array]:
    """(H per tap ``[in, in]``, the layer's output) for hidden states ``h [B,T,d]`` entering one
    decoder layer. Tokens at ``position < skip`` are left out of every H (P-GPTQ with skip=4)."""
    taps: dict[str, jax.Array] = {}
    cos, sin = rope_cos_sin(cfg, jnp.maximum(positions, 0))
    out, _ = decoder_layer(h, layer, cfg, cos=cos, sin=sin, positions=positions,
                           segment_ids=segment_ids, cache_kv=None, taps=taps)
    keep = (positions >= skip).astype(jnp.float32)
    hess = {}
    for name, x in taps.items():
        x = x.reshape(*x.shape[:2], -1)
        g, n = _gram(x, keep)
        hess[name] = np.asarray(g / jnp.maximum(n, 1.0), np.float64)
    return hess, out
