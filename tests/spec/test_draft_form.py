"""The draft head's CPM.cu form (``cpmjax.model.mtp.DRAFT_FORMS``): its logits match a PyTorch
reimplementation of CPM.cu's EAGLE draft forward, it is lossless inside the speculative engine,
it trains, and files and runs carry their form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from cpmjax.convert.hf_files.modeling_minicpm import MiniCPMDecoderLayer, MiniCPMRotaryEmbedding
from cpmjax.model import forward
from cpmjax.model.mtp import (draft_form_of, load_mtp, mtp_logits, mtp_to_hf, save_mtp,
                              train_draft)
from cpmjax.serve.generate import speculative_generate
from tests.conftest import tiny_hf_config
from tests.spec.helpers import greedy_oracle, small_models


def _cpmcu_draft_logits_torch(hf_config: dict, target: dict, draft: dict,
                              hidden_post: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """CPM.cu's EAGLE draft forward (``speculative/eagle.py``, ``minicpm4_eagle.cuh``), written
    for this test from that description in torch on HF-layout tensors: the target's hidden state
    after its final norm and the next token's embedding (times scale_emb, as the target embeds)
    are each RMS-normed (``input_norm2`` / ``input_norm1``), concatenated embedding first,
    projected by ``fc`` (with bias), run through one MiniCPM decoder layer whose residual
    branches are scaled by scale_depth / sqrt(L + 1), and the layer output goes straight into
    ``lm_head``. The decoder layer is the project's PyTorch MiniCPM layer (checked against
    transformers' Llama in tests/convert/test_parity.py)."""
    c = SimpleNamespace(**hf_config)
    t = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in {**target, **draft}.items()}

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    layer = MiniCPMDecoderLayer(c, 0)
    layer.load_state_dict({k[len("layers.0."):]: v for k, v in t.items()
                           if k.startswith("layers.0.")})
    layer.residual_scale = c.scale_depth / math.sqrt(c.num_hidden_layers + 1)
    emb = t["model.embed_tokens.weight"][torch.tensor(next_tokens)] * c.scale_emb
    x = torch.cat([norm(emb, t["input_norm1.weight"]),
                   norm(torch.tensor(hidden_post), t["input_norm2.weight"])], -1)
    h = x @ t["fc.weight"].T + t["fc.bias"]
    B, T, _ = h.shape
    cos, sin = MiniCPMRotaryEmbedding(c)(torch.arange(T)[None].expand(B, T))
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    with torch.no_grad():
        h = layer(h, cos, sin, mask, None)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return (h @ head.T).numpy()


def _models(seed: int, **overrides):
    """small_models with a target final-norm gain that is not all ones: with unit gains the
    post-norm hidden state is the pre-norm one after the draft's own RMSNorm, and the two forms
    would draft alike."""
    cfg, params, draft = small_models(seed=seed, **overrides)
    gain = jax.random.uniform(jax.random.key(seed + 11), params["final_norm"].shape,
                              minval=0.3, maxval=2.0)
    return cfg, {**params, "final_norm": gain.astype(params["final_norm"].dtype)}, draft


@pytest.mark.parametrize("tied", [False, True])
def test_cpmcu_form_matches_a_torch_reimplementation_of_cpmcu(tied: bool) -> None:
    cfg, params, draft = _models(3, tie_word_embeddings=tied)
    assert cfg.width_multiplier != 1.0  # the forms would agree on the division otherwise
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 12))
    hidden = forward(params, cfg, jnp.asarray(tokens), return_logits=False).hidden
    nxt = rng.integers(0, cfg.vocab_size, (2, 12))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    ours = np.asarray(mtp_logits(draft, params, cfg, hidden, jnp.asarray(nxt), pos,
                                 form="cpmcu"))
    post = np.asarray(forward(params, cfg, jnp.asarray(tokens)).logits)  # checked below
    hidden_post = np.asarray(hidden) / np.sqrt(np.mean(np.asarray(hidden) ** 2, -1,
                                                       keepdims=True) + cfg.rms_norm_eps)
    hidden_post = hidden_post * np.asarray(params["final_norm"])
    target = {"model.embed_tokens.weight": params["embed"]}
    if not tied:
        target["lm_head.weight"] = np.asarray(params["lm_head"]).T
    hf_config = tiny_hf_config(vocab_size=97, num_hidden_layers=2, tie_word_embeddings=tied)
    theirs = _cpmcu_draft_logits_torch(hf_config, target, mtp_to_hf(cfg, draft), hidden_post,
                                       nxt)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # the target's own logits are the post-norm hidden through the head after the muP division
    head = np.asarray(params["embed"]).T if tied else np.asarray(params["lm_head"])
    np.testing.assert_allclose(post, hidden_post / cfg.width_multiplier @ head, rtol=1e-4,
                               atol=1e-4)
    # and the other form computes something else on the same weights
    mtp = np.asarray(mtp_logits(draft, params, cfg, hidden, jnp.asarray(nxt), pos))
    assert np.abs(mtp - ours).max() > 1e-2


def _batches(rows: np.ndarray):
    r, T = np.random.default_rng(1), rows.shape[1] - 1
    while True:
        x = rows[r.choice(len(rows), 16, replace=False)]
        yield {"inputs": x[:, :-1], "targets": x[:, 1:],
               "positions": np.broadcast_to(np.arange(T), (16, T)),
               "segment_ids": np.ones((16, T), np.int32), "loss_mask": np.ones((16, T))}


def test_cpmcu_form_trains_and_decodes_losslessly_in_its_form() -> None:
    cfg, params, draft = _models(7)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, size=(40, 4)).tolist()
    rows, _ = speculative_generate(cfg, params, draft, prompts, 24, k=1)
    rows = np.concatenate([np.asarray(prompts), rows], axis=1)
    trained = train_draft(cfg, params, _batches(rows[:32]), steps=150, lr=3e-3,
                          mtp_params=draft, form="cpmcu")
    held = rows[32:, :6].tolist()
    _, before = speculative_generate(cfg, params, draft, held, 16, k=3, form="cpmcu")
    toks, right = speculative_generate(cfg, params, trained, held, 16, k=3, form="cpmcu")
    _, wrong = speculative_generate(cfg, params, trained, held, 16, k=3, form="mtp")
    assert right["mean_accept_length"] > before["mean_accept_length"] + 0.5, (before, right)
    # the engine drafts in the form it was given: the head run in the other form accepts less
    assert right["mean_accept_length"] > wrong["mean_accept_length"], (right, wrong)
    for prompt, out in zip(held, toks):  # exact whichever form drafts
        assert out.tolist() == greedy_oracle(cfg, params, prompt, 16)
    sampled, _ = speculative_generate(cfg, params, trained, held[:2], 8, k=3, temperature=1.0,
                                      form="cpmcu")
    again, _ = speculative_generate(cfg, params, trained, held[:2], 8, k=3, temperature=1.0,
                                    form="cpmcu")
    np.testing.assert_array_equal(sampled, again)  # seeded sampling is reproducible


def test_files_record_their_form_and_foreign_files_are_cpmcu(tmp_path) -> None:
    cfg, _, draft = small_models()
    save_mtp(cfg, draft, tmp_path / "mtp.safetensors")
    save_mtp(cfg, draft, tmp_path / "cpmcu.safetensors", form="cpmcu")
    assert draft_form_of(tmp_path / "mtp.safetensors") == "mtp"
    assert draft_form_of(tmp_path / "cpmcu.safetensors") == "cpmcu"
    save_file(load_file(str(tmp_path / "mtp.safetensors")), str(tmp_path / "eagle.safetensors"))
    assert draft_form_of(tmp_path / "eagle.safetensors") == "cpmcu"  # no metadata: CPM.cu's
    for a, b in zip(jax.tree.leaves(draft), jax.tree.leaves(load_mtp(cfg, tmp_path /
                                                                     "eagle.safetensors"))):
        np.testing.assert_array_equal(a, b)
    save_file(load_file(str(tmp_path / "mtp.safetensors")), str(tmp_path / "odd.safetensors"),
              metadata={"draft_form": "medusa"})
    with pytest.raises(ValueError, match="draft_form='medusa' is not one of"):
        draft_form_of(tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match="draft form must be one of"):
        save_mtp(cfg, draft, tmp_path / "x.safetensors", form="medusa")
    assert not (tmp_path / "x.safetensors").exists()
