"""InfLLM v2 attention of speculation-tree nodes (`cpmjax.sparse.attend.sparse_tree_attend`):
every node's logits equal one-token decoding at its position with its ancestors committed,
in sparse mode, in dense mode, and with each node deciding the mode from its own position."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.config import ConfigError
from cpmjax.model import forward, init_cache, init_params
from cpmjax.model.transformer import TreeAttention
from cpmjax.serve.tree import _visible, ancestor_mask
from cpmjax.sparse.attend import check_tree_depth
from tests.sparse.test_sparse_model import make_cfg

S = 160
# committed lengths: 95 puts the root at a coarse kernel's end (kernels end at 31 + 16 j), 121
# puts one at depth 6 of the deepest path
LENGTHS = (95, 121)
PARENT = [0, 0, 0, 1, 1, 2, 3, 5, 6, 7, 8, 9, 11]  # the root is its own parent
DEPTH = [0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6]


def _prefilled(cfg, params, tokens):
    m = jnp.asarray(LENGTHS)
    width = max(LENGTHS)
    pos = jnp.where(jnp.arange(width) < m[:, None], jnp.arange(width), -1)
    return forward(params, cfg, tokens[:, :width], positions=pos,
                   cache=init_cache(cfg, len(LENGTHS), S)).cache


def _one_token_decoding(cfg, params, cache, tree_tokens, impl):
    """Each node as its own row: its path fed one token per step, its last logits kept."""
    b, t = tree_tokens.shape
    m = np.repeat(np.asarray(LENGTHS), t)
    anc = np.asarray(ancestor_mask(jnp.asarray([PARENT] * b), max(DEPTH))).reshape(b * t, t)
    depth = np.tile(DEPTH, b)
    toks = np.asarray(tree_tokens).reshape(b * t)
    row_of = np.repeat(np.arange(b), t)
    cache = jax.tree.map(lambda x: jnp.repeat(x, t, axis=1), cache)
    step = jax.jit(lambda c, tok, pos: forward(params, cfg, tok, positions=pos, cache=c,
                                               sparse_impl=impl))
    want = np.zeros((b * t, cfg.vocab_size), np.float32)
    for i in range(max(DEPTH) + 1):
        # node r's ancestor at depth i (a tree index of its own row)
        at = [next((a for a in range(t) if anc[r, a] and DEPTH[a] == i), 0) for r in range(b * t)]
        tok = toks[row_of * t + np.asarray(at)]
        pos = np.where(i <= depth, m + i, -1)
        out = step(cache, jnp.asarray(tok[:, None]), jnp.asarray(pos[:, None], jnp.int32))
        cache = out.cache
        done = depth == i
        want[done] = np.asarray(out.logits[:, 0])[done]
    return want.reshape(b, t, -1)


def _tree_round_inputs(cfg, span=S):
    """Random weights, the two rows prefilled, random tree tokens, the tree's attention over
    the first ``span`` cache positions and its nodes' positions."""
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, S), 0, cfg.vocab_size)
    tree_tokens = jax.random.randint(jax.random.PRNGKey(2), (2, len(PARENT)), 0,
                                     cfg.vocab_size)
    m = jnp.asarray(LENGTHS)
    t = len(PARENT)
    anc = ancestor_mask(jnp.asarray([PARENT] * 2), max(DEPTH))
    tree = TreeAttention(m[:, None] + jnp.arange(t), _visible(m, anc, t, span))
    return (params, _prefilled(cfg, params, tokens), tree_tokens, tree,
            m[:, None] + jnp.asarray(DEPTH))


@pytest.mark.parametrize("dense_len, impl, kv_len", [
    (-1, "xla", None), (-1, "pallas_interpret", None), (-1, "xla", 144), (-1, "xla", 128),
    (100, "xla", None), (1000, "xla", None)])
def test_tree_nodes_attend_as_one_token_decoding(dense_len, impl, kv_len):
    """dense_len -1: every node sparse (the Pallas TPU kernel, interpreted, too); 100: the
    first row's nodes at positions 95..98 are dense and those at 99.. sparse (each decides for
    itself), the second row's all sparse; 1000: the read is shorter than dense_len, so the tree
    takes masked dense attention, as decoding does. ``kv_len``: the round reads only the
    cache positions (and compressed keys) below it, as the engine's length buckets do; at 128
    the second row's nodes 7.. sit at slots past it (a round near the cache's end), are seen by
    no other node and are not compared."""
    cfg = make_cfg(dense_len=dense_len)
    params, cache, tree_tokens, tree, positions = _tree_round_inputs(cfg, kv_len or S)
    got = forward(params, cfg, tree_tokens, positions=positions, cache=cache, tree=tree,
                  sparse_impl=impl, kv_len=kv_len)
    want = _one_token_decoding(cfg, params, cache, tree_tokens, impl)
    inside = np.asarray(tree.slots) < (kv_len or S)
    assert inside[0].all() and inside[1].sum() == (7 if kv_len == 128 else len(PARENT))
    np.testing.assert_allclose(np.asarray(got.logits)[inside], want[inside], atol=5e-5,
                               rtol=1e-5)
    # the tree leaves the committed caches as they were (the round compacts them itself)
    for name in ("kc1", "kc2"):
        np.testing.assert_array_equal(got.cache[name], cache[name])


def test_dense_attention_over_a_sparse_prefix_is_not_what_decoding_computes():
    """The check above can fail: masked dense attention (the tree path of dense models) gives
    logits 20x the tolerance away once the prefix is really sparse."""
    cfg = make_cfg()
    params, cache, tree_tokens, tree, positions = _tree_round_inputs(cfg)
    dense = forward(params, make_cfg(off=True), tree_tokens, positions=positions,
                    cache={"k": cache["k"], "v": cache["v"]}, tree=tree)
    want = _one_token_decoding(cfg, params, cache, tree_tokens, "xla")
    assert np.abs(np.asarray(dense.logits) - want).max() > 1e-3


@pytest.mark.parametrize("depth, match", [(16, "shallower than the coarse kernel stride"),
                                          (9, "inside its local window")])
def test_trees_too_deep_for_the_exact_form_are_named(depth, match):
    sc = make_cfg().sparse_config  # kernel 8/4, blocks of 16, window 16: one local block
    check_tree_depth(sc, 8)
    with pytest.raises(ConfigError, match=match):
        check_tree_depth(sc, depth)
