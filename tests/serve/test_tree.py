"""Tree speculative decoding's pure functions: the drafted tree is a tree, the coupled rule
accepts exactly the target's path, the multi-candidate rejection rule keeps the target
distribution, and shapes are validated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.serve.speculative import init_draft_cache
from cpmjax.serve.tree import (Tree, TreeShape, accept_coupled, accept_rejection, accepted_nodes,
                               ancestor_mask, chain_tokens, check_tree_shape, draft_tree,
                               path_of)
from tests.spec.helpers import small_models


def _tree(parent: list[int], tokens: list[int], depth: list[int]) -> Tree:
    p = jnp.asarray([parent], jnp.int32)
    return Tree(jnp.asarray([tokens], jnp.int32), jnp.asarray([depth], jnp.int32), p,
                ancestor_mask(p, max(depth)))


def test_drafted_tree_is_a_tree_of_distinct_siblings():
    cfg, params, draft = small_models()
    shape = TreeShape(4, 3, 10)
    B = 3
    cache = init_draft_cache(cfg, B, 64)
    cache["h"] = jax.random.normal(jax.random.key(0), cache["h"].shape)
    lengths = jnp.asarray([5, 17, -1], jnp.int32)
    tree, _ = draft_tree(params, draft, cfg, shape, cache, jnp.asarray([3, 4, 0]), lengths,
                         None, None, jnp.zeros((B,)), jnp.float32, 64, "mtp")
    par, dep, tok = (np.asarray(x) for x in (tree.parent, tree.depth, tree.tokens))
    assert par.shape == (B, shape.size + 1)
    for b in range(B):
        assert (par[b, 1:] >= 0).all() and (par[b, 1:] < np.arange(1, shape.size + 1)).all()
        assert (dep[b, 1:] == dep[b, par[b, 1:]] + 1).all() and dep[b].max() <= shape.depth
        for u in range(shape.size + 1):  # siblings hold distinct tokens
            kids = tok[b, 1:][par[b, 1:] == u]
            assert len(set(kids.tolist())) == len(kids)
        assert (dep[b] == 1).sum() <= shape.topk


def test_coupled_rule_takes_the_path_of_target_tokens():
    #        0(root)
    #     1(a)   2(b)
    #   3(c) 4(d)  5(c)
    tree = _tree([0, 0, 0, 1, 1, 2], [9, 10, 11, 12, 13, 12], [0, 1, 1, 2, 2, 2])
    ok = jnp.ones((1, 6), bool)
    cases = {(11, 0, 12, 0, 0, 0): 5,  # root -> b (11), b's target 12 -> node 5
             (10, 13, 0, 0, 0, 0): 4,  # root -> a, a's target 13 -> node 4
             (10, 7, 0, 0, 0, 0): 1,  # a's target 7 is no child: stop at a
             (7, 13, 12, 0, 0, 0): 0}  # nothing after the root
    for targets, want in cases.items():
        u = accept_coupled(tree, jnp.asarray([targets], jnp.int32), ok)
        assert int(u[0]) == want
        assert np.asarray(path_of(tree, u, 2))[0, :int(tree.depth[0, want]) + 1].tolist() == \
            {5: [0, 2, 5], 4: [0, 1, 4], 1: [0, 1], 0: [0]}[want]
    # a node that may not be accepted (its slot past the cache) stops the walk at its parent
    u = accept_coupled(tree, jnp.asarray([(11, 0, 12, 0, 0, 0)], jnp.int32),
                       ok.at[0, 5].set(False))
    assert int(u[0]) == 2


def test_the_chain_of_first_children_is_read_off_the_accepted_path():
    #        0(root)
    #     1(a*)   2(b)          * first child: the draft's top-ranked token there
    #   3(c*) 4(d)  5(c*)
    tree = _tree([0, 0, 0, 1, 1, 2], [9, 10, 11, 12, 13, 12], [0, 1, 1, 2, 2, 2])
    tree = tree._replace(first=jnp.asarray([[True, True, False, True, False, True]]))
    ok = jnp.ones((1, 6), bool)
    cases = {(10, 12, 0, 0, 0, 0): 3,  # the target follows a, c: the chain accepts both
             (10, 13, 0, 0, 0, 0): 2,  # a accepted, then d (not first): the chain has a only
             (11, 0, 12, 0, 0, 0): 1,  # b: the chain's first proposal a is rejected
             (7, 0, 0, 0, 0, 0): 1}
    for targets, want in cases.items():
        accepted = accepted_nodes(tree, jnp.asarray([targets], jnp.int32), ok)
        assert int(chain_tokens(tree, accepted)[0]) == want, targets


def test_drafted_trees_mark_the_draft_chain():
    """The first children of a drafted tree from the root down are the draft's greedy chain:
    each the argmax at its node (checked against drafting a (depth, 1, depth) chain tree)."""
    cfg, params, draft = small_models()
    B, D = 3, 3
    cache = init_draft_cache(cfg, B, 64)
    cache["h"] = jax.random.normal(jax.random.key(0), cache["h"].shape)
    lengths = jnp.asarray([5, 17, 9], jnp.int32)
    args = (cache, jnp.asarray([3, 4, 0]), lengths, None, None, jnp.zeros((B,)), jnp.float32,
            64, "mtp")
    tree, _ = draft_tree(params, draft, cfg, TreeShape(D, 2, 2 + (D - 1) * 4), *args)
    chain, _ = draft_tree(params, draft, cfg, TreeShape(D, 1, D), *args)
    on_chain = ~np.any(np.asarray(tree.ancestors) & ~np.asarray(tree.first)[:, None, :], -1)
    for b in range(B):  # with every node kept, the chain of firsts may still leave the
        # frontier (a first child outscored by two cousins): compare the part the tree holds
        got = {int(d): int(t) for d, t, c in zip(np.asarray(tree.depth[b]),
                                                 np.asarray(tree.tokens[b]), on_chain[b]) if c}
        assert got[1] == int(chain.tokens[b, 1])
        assert all(got[d] == int(chain.tokens[b, d]) for d in got if d > 0)


def test_rejection_rule_keeps_the_target_distribution():
    """V=4: the root has children tokens 0 and 2, node 1 (token 0) has children 1 and 3. The
    emitted (first, second) tokens over 40000 draws follow p_root(x) p_x(y) whatever the
    children are (chi-square with generous but failing-when-wrong bounds)."""
    tree = _tree([0, 0, 0, 1, 1], [3, 0, 2, 1, 3], [0, 1, 1, 2, 2])
    p_root = jnp.asarray([0.5, 0.1, 0.3, 0.1])
    p_at = {0: jnp.asarray([0.2, 0.2, 0.2, 0.4]), 2: jnp.asarray([0.7, 0.1, 0.1, 0.1])}
    p = jnp.stack([p_root, p_at[0], p_at[2], jnp.full((4,), 0.25), jnp.full((4,), 0.25)])
    n = 40000
    keys = jax.random.split(jax.random.key(0), n)
    run = jax.jit(jax.vmap(lambda k: accept_rejection(tree, p[None], jnp.ones((1, 5), bool),
                                                      k[None])))
    u, nxt = (np.asarray(x)[:, 0] for x in run(keys))
    toks, par = np.asarray(tree.tokens)[0], np.asarray(tree.parent)[0]
    on_level1 = np.where(np.asarray(tree.depth)[0, u] == 2, par[u], u)  # u's depth-1 ancestor
    first = np.where(u == 0, nxt, toks[on_level1])
    counts = np.bincount(first, minlength=4)
    expected = np.asarray(p_root) * n
    assert ((counts - expected) ** 2 / expected).sum() < 25.0  # chi2(3): p ~ 1e-5
    # second token after an accepted first token 0 (node 1): its target row
    sel = (u >= 1) & (on_level1 == 1)
    second = np.where(u[sel] == 1, nxt[sel], toks[u[sel]])
    c2 = np.bincount(second, minlength=4)
    e2 = np.asarray(p_at[0]) * sel.sum()
    assert ((c2 - e2) ** 2 / e2).sum() < 25.0
    # the rule is not vacuous: the tree's children are often accepted
    assert (u > 0).mean() > 0.4


def test_greedy_rows_under_the_rejection_rule_emit_the_argmax():
    tree = _tree([0, 0, 0, 1], [3, 0, 2, 1], [0, 1, 1, 2])
    p = jax.nn.one_hot(jnp.asarray([[2, 1, 3, 0]]), 4)  # root's argmax 2 -> node 2 (target 3)
    for seed in range(5):
        u, nxt = accept_rejection(tree, p, jnp.ones((1, 4), bool),
                                  jax.random.split(jax.random.key(seed), 1))
        assert (int(u[0]), int(nxt[0])) == (2, 3)


@pytest.mark.parametrize("bad, match", [
    ((1, 2), "three integers"), (("a", 1, 1), "three integers"), ((-1, 1, 0), "depth must"),
    ((2, 0, 2), "topk >= 1"), ((3, 2, 2), r"= \[3, 10\]"),
    ((2, 2, 7), r"\[2, 6\]"), ((0, 1, 3), "0 for depth 0")])
def test_bad_tree_shapes_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        check_tree_shape(bad)


def test_shape_sizes():
    s = check_tree_shape((4, 4, 16))
    assert (s.pool, s.lookahead) == (4 + 3 * 16, 16)
    assert check_tree_shape((5, 1, 5)).lookahead == 5
