"""Tree speculative decoding: EAGLE-2's dynamic draft trees (arXiv 2406.16858 §4), verified in
one target step under a tree attention mask (SpecInfer, arXiv 2305.09781 §4), the longest
accepted path kept and both KV caches compacted to it. Pure functions over decode-slot rows;
``cpmjax.serve.tree_engine`` runs them as its decode step.

A round, per row holding committed tokens x_0..x_m (``last`` = x_m goes at position m), for a
:class:`TreeShape` (depth D, top-k K, size N):

1. draft (EAGLE-2's expansion): the draft head's K most likely tokens after x_m are level 1; at
   each further level the K frontier nodes of highest cumulative draft log-probability are
   expanded by one batched draft-layer pass over the K nodes (each attends to the committed
   prefix and its own ancestors: its key sits in a scratch slot past the committed length), K
   children each. Of every node drafted (K + (D-1)K^2), the N of highest cumulative score form
   the tree (EAGLE-2's re-ranking); a child never scores above its parent, so they form a tree;
2. verify: ONE target forward over [x_m, the N nodes] at RoPE positions m + depth, each node's
   key written at slot m + its index, attention masked to the prefix and its ancestors;
3. accept (see below), then compact: the accepted path's keys and values are copied from their
   slots to positions m..m+n of the target cache, which is then position-addressed again (a
   sparse model's compressed keys are recomputed for those positions), and the draft layer
   re-reads the accepted pairs at m..m+n as in the chain round (``cpmjax.serve.speculative``),
   which overwrites its scratch slots.

(D, 1, D) is a chain; depth 0 names a plain step (the engine's, ``cpmjax.serve.tree_engine``).

**Acceptance.** Two rules, both lossless:

- ``"coupled"`` (the default): the target's token after node u is the token plain decoding
  would draw there, the argmax of its warped logits plus the row's Gumbel noise for that token
  number (``cpmjax.serve.sampling.step_noise``; greedy rows: the argmax). The accepted path is
  the one whose tokens equal those, so the output is token for token what plain decoding
  emits with the same seed, whatever the draft, the tree or the batch: speculation becomes a
  choice of speed only (drafter-invariant speculative decoding, Daliri et al., arXiv
  2408.07978). Sampled rows draft with the same noise (children by the draft's perturbed
  log-probabilities), so a draft close to the target guesses the very token drawn.
- ``"rejection"``: EAGLE's multi-candidate speculative sampling over deterministic top-K
  children (EAGLE, arXiv 2401.15077 §3.3; SpecInfer's multi-step speculative sampling): at node
  u try its children in order, accepting child c with probability r(c)/sum(r) where r starts as
  the target distribution at u and a rejected child's token is zeroed in r; after the last
  child, the next token is drawn from r. Each trial is an exact sequential draw from p, so the
  emitted tokens follow the target's distribution.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cpmjax.config import ModelConfig
from cpmjax.model import forward
from cpmjax.model.cache import KVCache
from cpmjax.model.mtp import draft_feature, draft_logits, mtp_block
from cpmjax.model.params import Params
from cpmjax.model.transformer import TreeAttention
from cpmjax.quant.qforward import dense_draft, layer_transform_for
from cpmjax.serve.sampling import argmax_last, row_keys, step_noise, warp
from cpmjax.serve.speculative import (DraftCache, RoundOut, RowSampling, draft_kv, target_probs,
                                      with_kv)
from cpmjax.sparse.cache import update_compressed

RULES = ("coupled", "rejection")


class TreeShape(NamedTuple):
    """Draft tree: ``depth`` levels (0: no drafting), ``topk`` children per expanded node (and
    nodes expanded per level), ``size`` drafted nodes verified."""

    depth: int
    topk: int
    size: int

    @property
    def pool(self) -> int:
        """Nodes drafted before re-ranking: K at level 1, K^2 at every further level."""
        return 0 if self.depth == 0 else self.topk + (self.depth - 1) * self.topk ** 2

    @property
    def lookahead(self) -> int:
        """Cache slots past the newest token a round writes (tree nodes, draft scratch)."""
        return max(self.size, (self.depth - 1) * self.topk, self.depth)


def check_tree_shape(shape: Any) -> TreeShape:
    """A :class:`TreeShape` from ``(depth, topk, size)``, each rule named when broken."""
    try:
        depth, topk, size = (int(x) for x in shape)
    except (TypeError, ValueError):
        raise ValueError(f"tree shape must be three integers (depth, topk, size), got {shape!r}")
    if depth < 0 or topk < 1:
        raise ValueError(f"tree depth must be >= 0 and topk >= 1, got depth={depth}, "
                         f"topk={topk}")
    s = TreeShape(depth, topk, size)
    if not (depth <= size <= s.pool if depth else size == 0):
        raise ValueError(f"tree size must be in [depth, topk + (depth-1)*topk^2] = [{depth}, "
                         f"{s.pool}] (0 for depth 0), got {size}")
    return s


class Tree(NamedTuple):
    """The verified tree of every row, root (``last``) first, parents before children."""

    tokens: jax.Array  # int32 [B, N+1]
    depth: jax.Array  # int32 [B, N+1]
    parent: jax.Array  # int32 [B, N+1], tree index (root: 0); -1: parent not in the tree
    ancestors: jax.Array  # bool [B, N+1, N+1]: [i, a] iff a is i or an ancestor of i
    # bool [B, N+1]: the node is its parent's first child, the draft's top-ranked token there
    # (root: True); the nodes of the tree whose ancestors are all first form the chain the
    # draft would have proposed (None: not recorded)
    first: jax.Array | None = None


def _visible(lengths: jax.Array, own: jax.Array, width: int, span: int) -> jax.Array:
    """bool ``[B, T, span]`` mask: cache slots below each row's length, plus slot length + j for
    every j with ``own[b, t, j]`` (``own`` ``[B, T, width]``: the query's scratch ancestors)."""
    rel = jnp.arange(span)[None] - lengths[:, None]  # [B, span]
    inside = (rel >= 0) & (rel < width)
    idx = jnp.broadcast_to(jnp.clip(rel, 0, width - 1)[:, None], own.shape[:2] + (span,))
    return (rel < 0)[:, None] | (inside[:, None] & jnp.take_along_axis(own, idx, axis=2))


def _draft_scores(params: Params, cfg: ModelConfig, h: jax.Array, form: str,
                  vocab_ids: jax.Array | None, head: jax.Array | None,
                  noise: jax.Array | None, temperature: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """(ranking scores, log-probabilities) ``[B, R, V']`` of the draft's next token at the nodes
    ``h [B, R, d]``: sampled rows rank by their perturbed tempered log-probabilities
    (``noise [B, V]`` of the token number drawn there), greedy rows by the log-probabilities."""
    logits = draft_logits(params, cfg, h, form, vocab_ids, head)
    logq = jax.nn.log_softmax(logits, axis=-1)
    if noise is None:
        return logq, logq
    g = noise if vocab_ids is None else jnp.take(noise, vocab_ids, axis=1)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
    pert = jax.nn.log_softmax(logits / t, axis=-1) + g[:, None]
    return jnp.where((temperature > 0)[:, None, None], pert, logq), logq


def draft_tree(params: Params, draft_params: Params, cfg: ModelConfig, shape: TreeShape,
               draft: DraftCache, last: jax.Array, lengths: jax.Array,
               vocab_ids: jax.Array | None, noise: jax.Array | None, temperature: jax.Array,
               dtype: Any, kv_len: int | None, form: str, head: jax.Array | None = None
               ) -> tuple[Tree, tuple[jax.Array, ...]]:
    """EAGLE-2 drafting (module docstring, step 1): the tree and the draft layer's cache (its
    scratch slots written). ``noise [B, D, V]``: each row's noise of the tokens after depths
    0..D-1 (None: rank by log-probabilities only); ``head``: as for `tree_round`."""
    B, K, D, N = lengths.shape[0], shape.topk, shape.depth, shape.size
    rows = jnp.arange(B)[:, None]
    kv = draft_kv(draft)
    root = Tree(last[:, None], jnp.zeros((B, 1), jnp.int32), jnp.zeros((B, 1), jnp.int32),
                jnp.ones((B, 1, 1), bool))
    active = lengths >= 0
    span = kv[0].shape[1] if kv_len is None else kv_len
    width = max((D - 1) * K, 1)

    def ids(idx: jax.Array) -> jax.Array:
        return idx.astype(jnp.int32) if vocab_ids is None else vocab_ids[idx]

    rank, logq = _draft_scores(params, cfg, draft["h"][:, None], form, vocab_ids, head,
                               None if noise is None else noise[:, 0], temperature)
    _, idx = jax.lax.top_k(rank[:, 0], K)
    toks, scores = [ids(idx)], [jnp.take_along_axis(logq[:, 0], idx, axis=1)]
    parents, depths = [jnp.full((B, K), -1, jnp.int32)], [jnp.ones((B, K), jnp.int32)]
    firsts = [jnp.arange(K) == 0]  # top_k orders each node's children by rank
    f_pool, f_score, f_tok = jnp.broadcast_to(jnp.arange(K), (B, K)), scores[0], toks[0]
    f_feat = jnp.broadcast_to(draft["h"][:, None], (B, K, draft["h"].shape[-1]))
    f_anc = jnp.zeros((B, K, width), bool)
    for j in range(1, D):
        scratch = (j - 1) * K + jnp.arange(K)
        anc = f_anc | jax.nn.one_hot(scratch, width, dtype=bool)[None]
        slots = jnp.where(active[:, None], lengths[:, None] + scratch, -1)
        pos = jnp.broadcast_to(jnp.where(active, lengths + j - 1, -1)[:, None], (B, K))
        h, kv = mtp_block(draft_params, params, cfg, f_feat.astype(dtype), f_tok, pos,
                          cache_kv=kv, kv_len=kv_len,
                          tree=TreeAttention(slots, _visible(lengths, anc, width, span)))
        rank, logq = _draft_scores(params, cfg, h, form, vocab_ids, head,
                                   None if noise is None else noise[:, j], temperature)
        _, cidx = jax.lax.top_k(rank, K)  # [B, K, K]
        cscore = (f_score[:, :, None] + jnp.take_along_axis(logq, cidx, axis=2)).reshape(B, -1)
        ctok = ids(cidx).reshape(B, -1)
        toks.append(ctok)
        scores.append(cscore)
        parents.append(jnp.repeat(f_pool, K, axis=1))
        depths.append(jnp.full((B, K * K), j + 1, jnp.int32))
        firsts.append(jnp.arange(K * K) % K == 0)
        if j < D - 1:
            f_score, sel = jax.lax.top_k(cscore, K)
            f_pool = K + (j - 1) * K * K + sel
            f_tok = jnp.take_along_axis(ctok, sel, axis=1)
            f_feat = h[rows, sel // K]
            f_anc = anc[rows, sel // K]
    pool_tok, pool_parent, pool_depth = (jnp.concatenate(x, 1) for x in (toks, parents, depths))
    # the N best by cumulative score, in pool order (parents first; lax.top_k breaks ties
    # toward the lower index, so a parent is never dropped for an equal-scoring child)
    _, sel = jax.lax.top_k(jnp.concatenate(scores, 1), N)
    sel = jnp.sort(sel, axis=1)
    tree_index = jnp.full(pool_tok.shape, -1, jnp.int32).at[rows, sel].set(
        jnp.arange(1, N + 1, dtype=jnp.int32))
    pp = jnp.take_along_axis(pool_parent, sel, axis=1)
    parent = jnp.where(pp < 0, 0, jnp.take_along_axis(tree_index, jnp.maximum(pp, 0), axis=1))
    parent = jnp.concatenate([root.parent, parent], 1)
    first = jnp.concatenate(firsts)[sel]
    return Tree(jnp.concatenate([root.tokens, jnp.take_along_axis(pool_tok, sel, axis=1)], 1),
                jnp.concatenate([root.depth, jnp.take_along_axis(pool_depth, sel, axis=1)], 1),
                parent, ancestor_mask(parent, D),
                jnp.concatenate([jnp.ones((B, 1), bool), first], 1)), kv


def ancestor_mask(parent: jax.Array, depth: int) -> jax.Array:
    """bool ``[B, T, T]``: [i, a] iff a is node i or one of its ancestors (``parent [B, T]``,
    root at 0 its own parent; a node whose parent is -1 sees the root only)."""
    T = parent.shape[1]
    up = jnp.maximum(parent, 0)
    cur = jnp.broadcast_to(jnp.arange(T), parent.shape)
    anc = jax.nn.one_hot(cur, T, dtype=bool)
    for _ in range(depth):
        cur = jnp.take_along_axis(up, cur, axis=1)
        anc = anc | jax.nn.one_hot(cur, T, dtype=bool)
    return anc


def coupled_targets(logits: jax.Array, depth: jax.Array, s: RowSampling,
                    noise: jax.Array | None) -> jax.Array:
    """int32 ``[B, T]``: at every node (``logits [B, T, V]``, ``depth [B, T]``), the token plain
    decoding would emit after it: the argmax (greedy rows), or the argmax of the warped logits
    plus the row's noise for the token number ``steps + depth`` (``noise [B, D+1, V]``, as
    `step_noise` gives them; None: every row greedy)."""
    if noise is None:
        return argmax_last(logits)
    B, T, V = logits.shape
    warped = warp(logits.reshape(B * T, V), s.temperature.repeat(T), s.top_k.repeat(T),
                  s.top_p.repeat(T)).reshape(B, T, V)
    g = jnp.take_along_axis(noise, depth[:, :, None], axis=1)
    return jnp.where((s.temperature > 0)[:, None], argmax_last(warped + g), argmax_last(logits))


def round_noise(seed: jax.Array, steps: jax.Array, count: int, vocab: int) -> jax.Array:
    """``[B, count, V]``: each row's `step_noise` of its next ``count`` tokens."""
    return jax.vmap(lambda d: step_noise(seed, steps + d, vocab), out_axes=1)(jnp.arange(count))


def accepted_nodes(tree: Tree, targets: jax.Array, ok: jax.Array) -> jax.Array:
    """bool ``[B, N+1]``: the nodes whose path holds the target's token at every step
    (``targets [B, N+1]``: the target's token after each node; ``ok [B, N+1]``: nodes that may
    be accepted). Siblings hold distinct tokens, so they form one path from the root."""
    parent_target = jnp.take_along_axis(targets, jnp.maximum(tree.parent, 0), axis=1)
    match = (ok & (tree.tokens == parent_target)).at[:, 0].set(True)
    return ~jnp.any(tree.ancestors & ~match[:, None, :], axis=-1)


def accept_coupled(tree: Tree, targets: jax.Array, ok: jax.Array) -> jax.Array:
    """Tree index ``[B]`` of the deepest node of `accepted_nodes` (unique: they form a path)."""
    return _deepest(tree, accepted_nodes(tree, targets, ok))


def _deepest(tree: Tree, nodes: jax.Array) -> jax.Array:
    return jnp.argmax(jnp.where(nodes, tree.depth, -1), axis=-1).astype(jnp.int32)


def chain_tokens(tree: Tree, accepted: jax.Array) -> jax.Array:
    """int32 ``[B]``: the tokens a chain round of the tree's depth would have emitted in this
    round (its accepted drafts + 1), read off the tree: the chain proposes the draft's
    top-ranked token at each step, the tree's path of first children. Where re-ranking left
    part of that path out of the tree (a first child whose cumulative score fell below the
    kept nodes'), the chain's tokens past it are not seen: a lower bound."""
    on_chain = ~jnp.any(tree.ancestors & ~tree.first[:, None, :], axis=-1)
    return jnp.max(jnp.where(accepted & on_chain, tree.depth, 0), axis=-1).astype(jnp.int32) + 1


def accept_rejection(tree: Tree, p: jax.Array, ok: jax.Array, keys: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """(deepest accepted node [B], next token [B]) by the multi-candidate rule of the module
    docstring, from target distributions ``p [B, N+1, V]`` and one PRNG key per row."""
    B, T, V = p.shape
    rows = jnp.arange(B)
    k_u, k_r = jax.vmap(jax.random.split, out_axes=1)(keys)
    r = jax.vmap(lambda k: jax.random.uniform(k, (T,)))(k_u)
    u, resid = jnp.zeros((B,), jnp.int32), p[:, 0]
    for i in range(1, T):
        child = ok[:, i] & (tree.parent[:, i] == u)
        tok = tree.tokens[:, i]
        at = resid[rows, tok]
        accept = child & (r[:, i] * resid.sum(-1) < at)
        reject = child & ~accept
        resid = jnp.where(accept[:, None], p[:, i], resid.at[rows, tok].set(
            jnp.where(reject, 0.0, at)))
        u = jnp.where(accept, i, u)
    resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p[rows, u])
    return u, jax.vmap(jax.random.categorical)(k_r, jnp.log(resid)).astype(jnp.int32)


def path_of(tree: Tree, u: jax.Array, depth: int) -> jax.Array:
    """Tree indices ``[B, depth+1]`` of node u's ancestors at depths 0..depth (root first;
    entries below u's depth are 0)."""
    rows = jnp.arange(tree.tokens.shape[0])
    on_path = tree.ancestors[rows, u]  # [B, T]
    at = on_path[:, None, :] & (tree.depth[:, None, :] == jnp.arange(depth + 1)[None, :, None])
    return jnp.argmax(at, axis=-1).astype(jnp.int32)


def compact(cache: KVCache, cfg: ModelConfig, lengths: jax.Array, path: jax.Array,
            keep: jax.Array) -> KVCache:
    """The target cache with the path's keys/values moved from their slots (length + tree
    index) to positions length + 0..n (``keep [B, D+1]``: which path entries are accepted);
    a sparse model's compressed keys recomputed for the moved positions."""
    B = lengths.shape[0]
    rows = jnp.arange(B)[None, :, None]
    src = (lengths[:, None] + path)[None]
    dst = jnp.where(keep, lengths[:, None] + jnp.arange(path.shape[1]), -1)
    out = dict(cache)
    for name in ("k", "v"):
        c = cache[name]
        # the layer is an index of the gather and scatter too, not a window dimension: with
        # `c[:, rows, src]` libtpu relaid out the whole stacked cache (layers second-minor) in
        # and out of the step (compiled HLO of the MiniCPM4-8B round for a v5p chip)
        layers = jnp.arange(c.shape[0])[:, None, None]
        moved = c[layers, rows, src]  # [L, B, D+1, ...], read before any write
        out[name] = c.at[layers, rows, jnp.where(dst < 0, c.shape[2], dst)[None]].set(
            moved, mode="drop")
    if "kc1" in cache:
        # a layer at a time, updated in place in the loop's carry: vmapped over the layers,
        # libtpu relaid out the whole compressed-key cache in and out of the step, and a
        # lax.map's stacked output was copied into the donated buffer (compiled HLO, 8B round)
        def one_layer(i: jax.Array, kc: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
            new = update_compressed((kc[0][i], kc[1][i]), out["k"][i], dst, cfg.sparse_config)
            return kc[0].at[i].set(new[0]), kc[1].at[i].set(new[1])

        out["kc1"], out["kc2"] = jax.lax.fori_loop(0, cache["kc1"].shape[0], one_layer,
                                                   (cache["kc1"], cache["kc2"]))
    return out


def tree_round(params: Params, draft_params: Params, cfg: ModelConfig, shape: TreeShape,
               cache: KVCache, draft: DraftCache, last: jax.Array, lengths: jax.Array,
               seed: jax.Array, steps: jax.Array, sampling: RowSampling,
               vocab_ids: jax.Array | None, dtype: Any = jnp.float32, all_greedy: bool = False,
               kv_len: int | None = None, form: str = "mtp", rule: str = "coupled",
               head: jax.Array | None = None) -> RoundOut:
    """Draft a tree, verify it in one target step, accept and compact (module docstring).

    ``seed``/``steps [B]``: each row's seed and tokens generated so far (its randomness, as the
    plain engine's); ``all_greedy`` (static): every row is greedy (no noise, no warping).
    ``kv_len`` (static) must exceed every slot the round writes (lengths + ``lookahead``);
    nodes at slots past it are never accepted. ``rule`` (static): ``RULES``. ``head``: the
    FR-Spec head's weight, gathered already (``cpmjax.serve.frspec.frspec_head``).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if shape.depth < 1:
        raise ValueError(f"a tree round drafts: depth must be >= 1, got {shape.depth}")
    B, D = last.shape[0], shape.depth
    rows = jnp.arange(B)
    active = lengths >= 0
    draft_params = dense_draft(draft_params, cfg, dtype)
    noise = None
    if not all_greedy and rule == "coupled":
        noise = round_noise(seed, steps, D + 1, cfg.vocab_size)
    tree, kv = draft_tree(params, draft_params, cfg, shape, draft, last, lengths, vocab_ids,
                          noise, sampling.temperature, dtype, kv_len, form, head)
    T = shape.size + 1
    span = cache["k"].shape[2] if kv_len is None else kv_len
    slot = lengths[:, None] + jnp.arange(T)
    out = forward(params, cfg, tree.tokens,
                  positions=jnp.where(active[:, None], lengths[:, None] + tree.depth, -1),
                  cache=cache, dtype=dtype, kv_len=kv_len,
                  layer_transform=layer_transform_for(params, cfg, dtype),
                  tree=TreeAttention(jnp.where(active[:, None], slot, -1),
                                     _visible(lengths, tree.ancestors, T, span)))
    ok = (tree.parent >= 0) & (slot < span)
    if rule == "coupled" or all_greedy:  # all greedy: noise is None, the targets are argmaxes
        targets = coupled_targets(out.logits, tree.depth, sampling, noise)
        accepted = accepted_nodes(tree, targets, ok)
        u = _deepest(tree, accepted)
        nxt = targets[rows, u]
        # the chain kind emits the same tokens (coupled rule), so its count is comparable
        chain = jnp.where(active, chain_tokens(tree, accepted), 0)
    else:
        u, nxt = accept_rejection(tree, target_probs(out.logits, sampling), ok,
                                  row_keys(seed, steps))
        chain = None
    n = tree.depth[rows, u]
    path = path_of(tree, u, D)
    ar = jnp.arange(D + 1)[None]
    keep = active[:, None] & (ar <= n[:, None])
    new = jnp.take_along_axis(tree.tokens, jnp.concatenate([path[:, 1:], path[:, :1]], 1),
                              axis=1).at[rows, n].set(nxt)
    target_cache = compact(out.cache, cfg, lengths, path, keep)
    feature = jnp.take_along_axis(draft_feature(params, cfg, out.hidden, form),
                                  path[:, :, None], axis=1)
    hc, kv = mtp_block(draft_params, params, cfg, feature, new,
                       jnp.where(keep, lengths[:, None] + ar, -1), cache_kv=kv, kv_len=kv_len)
    h_next = jnp.where(active[:, None], hc[rows, n], draft["h"])
    return RoundOut(target_cache, with_kv(draft, kv, h_next.astype(draft["h"].dtype)), new,
                    jnp.where(active, n + 1, 0), jnp.where(active, nxt, last), chain)
