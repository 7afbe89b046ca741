"""The MTP/EAGLE draft head: document-masked loss, the CPM.cu fc input order through the HF
layout, safetensors round trip, and draft training raising the acceptance length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cpmjax.model import forward
from cpmjax.model.mtp import (load_mtp, mtp_forward, mtp_logits, mtp_loss, mtp_to_hf, save_mtp,
                              train_draft)
from cpmjax.serve.generate import speculative_generate
from tests.spec.helpers import small_models


def _packed_batch(cfg):
    """One row of two documents (lengths 7 and 9) as the data pipeline packs them."""
    rng = np.random.default_rng(0)
    toks = rng.integers(3, cfg.vocab_size, size=17)
    seg = np.array([1] * 7 + [2] * 10)  # token 16 belongs to doc 2 as a target only
    pos = np.r_[np.arange(7), np.arange(10)]
    return {"inputs": jnp.asarray(toks[None, :-1]), "targets": jnp.asarray(toks[None, 1:]),
            "segment_ids": jnp.asarray(seg[None, :-1]), "positions": jnp.asarray(pos[None, :-1]),
            "loss_mask": jnp.asarray((seg[1:] == seg[:-1])[None].astype(np.float32))}


def test_mtp_loss_predicts_two_ahead_within_documents_only():
    cfg, params, draft = small_models()
    b = _packed_batch(cfg)
    hidden = forward(params, cfg, b["inputs"], positions=b["positions"],
                     segment_ids=b["segment_ids"]).hidden
    total, count = mtp_loss(draft, params, cfg, hidden, b)
    logits = np.asarray(mtp_logits(draft, params, cfg, hidden, b["targets"], b["positions"],
                                   b["segment_ids"]))[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    seg, x = np.asarray(b["segment_ids"])[0], np.r_[np.asarray(b["inputs"])[0], b["targets"][0, -1]]
    full_seg = np.r_[seg, 2]
    want = [(-logp[i, x[i + 2]]) for i in range(15) if full_seg[i] == full_seg[i + 2]]
    assert float(count) == len(want) == 13  # 5 in doc 1 (i=0..4), 8 in doc 2 (i=7..14)
    np.testing.assert_allclose(float(total), sum(want), rtol=1e-5)


def test_fc_first_half_reads_the_embedding_second_half_the_hidden_state(tmp_path):
    """CPM.cu order through the HF layout: zero fc.weight's second input half and the output no
    longer depends on h_t; zero the first half and it no longer depends on x_{t+1}."""
    cfg, params, draft = small_models()
    d = cfg.hidden_size
    tensors = mtp_to_hf(cfg, draft)
    pos = jnp.arange(5)[None]
    h1, h2 = (jax.random.normal(jax.random.key(i), (1, 5, d)) for i in (1, 2))
    t1, t2 = jnp.asarray([[3, 4, 5, 6, 7]]), jnp.asarray([[9, 8, 7, 6, 5]])
    for half, (a, b) in ((slice(d, 2 * d), ((h1, t1), (h2, t1))),
                         (slice(0, d), ((h1, t1), (h1, t2)))):
        w = dict(tensors)
        w["fc.weight"] = w["fc.weight"].copy()
        w["fc.weight"][:, half] = 0
        save_file(w, str(tmp_path / "d.safetensors"))
        mp = load_mtp(cfg, tmp_path / "d.safetensors")
        np.testing.assert_allclose(mtp_forward(mp, params, cfg, a[0], a[1], pos),
                                   mtp_forward(mp, params, cfg, b[0], b[1], pos), atol=1e-6)
        full = mtp_forward(draft, params, cfg, a[0], a[1], pos)
        assert np.abs(full - mtp_forward(draft, params, cfg, b[0], b[1], pos)).max() > 1e-3


def test_safetensors_round_trip_and_missing_tensor(tmp_path):
    cfg, _, draft = small_models()
    save_mtp(cfg, draft, tmp_path / "draft.safetensors")
    back = load_mtp(cfg, tmp_path / "draft.safetensors")
    for a, b in zip(jax.tree.leaves(draft), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    t = load_file(str(tmp_path / "draft.safetensors"))
    assert t["fc.weight"].shape == (cfg.hidden_size, 2 * cfg.hidden_size)
    del t["input_norm2.weight"]
    save_file(t, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="input_norm2.weight"):
        load_mtp(cfg, tmp_path / "bad.safetensors")


def _greedy_rows(cfg, params, draft, prompts, n):
    """Rows continued greedily by the target (what the draft must learn to predict); greedy
    speculative decoding is plain greedy decoding (test_speculative)."""
    toks, _ = speculative_generate(cfg, params, draft, prompts, n, k=1)
    return np.concatenate([np.asarray(prompts), toks], axis=1)


def test_trained_draft_accepts_more_than_untrained():
    cfg, params, draft = small_models(seed=7)
    rng = np.random.default_rng(0)
    rows = _greedy_rows(cfg, params, draft, rng.integers(0, cfg.vocab_size, size=(48, 4)).tolist(), 28)
    train, held = rows[:40], rows[40:]
    T = train.shape[1] - 1

    def batches():
        r = np.random.default_rng(1)
        while True:
            x = train[r.choice(len(train), 16, replace=False)]
            yield {"inputs": x[:, :-1], "targets": x[:, 1:],
                   "positions": np.broadcast_to(np.arange(T), (16, T)),
                   "segment_ids": np.ones((16, T), np.int32), "loss_mask": np.ones((16, T))}

    trained = train_draft(cfg, params, batches(), steps=150, lr=3e-3, mtp_params=draft)
    prompts = held[:, :6].tolist()
    _, before = speculative_generate(cfg, params, draft, prompts, 20, k=3)
    toks, after = speculative_generate(cfg, params, trained, prompts, 20, k=3)
    assert after["mean_accept_length"] > before["mean_accept_length"] + 0.5, (before, after)
    # with most drafts accepted, the output is still exactly the target's greedy continuation
    np.testing.assert_array_equal(toks, held[:, 6:26])
