"""cpmjax.eval.sparse_retrieval: the task's rows, the phase flag, and the pair-block diagnostic."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from cpmjax.eval import sparse_retrieval as sr
from cpmjax.model import init_params


def test_rows_hide_the_pair_after_block_zero_in_the_first_quarter():
    tok, ans, where = sr.make_batch(np.random.default_rng(0), 64, 512, 3)
    rows = np.arange(64)
    assert ((where >= 16) & (where + 1 < 512 // 4)).all()
    assert (tok[rows, where] == tok[:, -sr.N_QUERY - 1]).all()  # the queried key
    assert (tok[rows, where + 1] == ans).all()  # its value is the answer
    assert (tok[:, -sr.N_QUERY:] == sr.QUERY).all()
    assert ((ans >= sr.VAL0) & (ans < sr.FILL0)).all()
    keys = tok[:, : 512 // 4]
    assert (((keys >= sr.KEY0) & (keys < sr.VAL0)).sum(1) == 3).all()  # 3 distinct pairs
    with pytest.raises(ValueError, match="too short"):
        sr.make_batch(np.random.default_rng(0), 1, 32, 1)


def test_parse_phases():
    assert sr.parse_phases("128:250:8,4096:30:2:1280") == [(128, 250, 8, 128), (4096, 30, 2, 1280)]
    for bad in ("128:250", "128:0:8", "a:1:1", "", "1:2:3:4:5"):
        with pytest.raises(ValueError, match="length:steps:batch"):
            sr.parse_phases(bad)
    with pytest.raises(ValueError, match="--sparse_phases item"):
        sr.parse_phases("1024:x:4", "sparse_phases")
    # position skipping in a sparse phase is refused before any training runs
    with pytest.raises(ValueError, match="dense phases only"):
        sr.run(length=256, dense_phases="128:1:1", sparse_phases="256:1:1:128", out=None)


def test_keep_ends_keeps_the_pair_and_query_at_their_positions():
    full, ans, where = sr.make_batch(np.random.default_rng(1), 16, 1024, 1)
    tok, pos = sr.keep_ends(full, 320)
    assert tok.shape == pos.shape == (16, 320)
    assert (pos[:, :256] == np.arange(256)).all() and (pos[:, 256:] == np.arange(960, 1024)).all()
    assert (np.take_along_axis(full, pos, 1) == tok).all()
    assert (tok[np.arange(16), where + 1] == ans).all() and (tok[:, -sr.N_QUERY:] == sr.QUERY).all()
    for keep in (256, 1025):
        with pytest.raises(ValueError, match="keep"):
            sr.keep_ends(full, keep)


@pytest.mark.parametrize("topk,expected", [(16, 1.0), (2, 0.0)])
def test_pair_block_selected(topk, expected):
    # 256 tokens = 16 blocks; the pair sits in blocks 1-3. topk=16 keeps every block; topk=2
    # leaves stage 1 no free choice (init + window + current block), so neither the pair's block
    # nor the next one is ever kept.
    cfg = sr.model_config(256, topk)
    params = init_params(cfg, jax.random.PRNGKey(0))
    out = sr.evaluate(params, cfg, rows=8, batch=4, length=256, n_pairs=1, seed=0)
    every = [[expected] * cfg.num_key_value_heads] * cfg.num_hidden_layers
    assert out["question_selects"] == {"pair_block": every, "pair_or_next_block": every}
    assert out["rows"] == 8 and 0.0 <= out["accuracy"] <= 1.0
