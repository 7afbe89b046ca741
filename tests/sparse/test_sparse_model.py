"""InfLLM v2 in the model: dense switch, all-blocks == dense, gradients, packed rows, decode, G=8."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.config import ConfigError, ModelConfig
from cpmjax.model import forward, init_cache, init_params
from kernels.infllmv2.layout import heads_view
from cpmjax.model.attention import attend
from cpmjax.sparse.cache import init_compressed, update_compressed
from kernels import infllmv2
from kernels.infllmv2.selection import pooled_kernels
from tests.conftest import tiny_hf_config

# small blocks so that short sequences are genuinely sparse: 3 blocks of 16 tokens per query
SPARSE = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=16,
              topk=2, use_nope=False, dense_len=-1)
T = 160  # 10 blocks: selection really drops blocks


def make_cfg(heads: int = 4, kv: int = 2, layers: int = 2, **sparse) -> ModelConfig:
    sc = None if sparse.get("off") else {**SPARSE, **sparse}
    return ModelConfig.from_hf_config(tiny_hf_config(
        sparse_config=sc, num_attention_heads=heads, num_key_value_heads=kv,
        num_hidden_layers=layers, hidden_size=16 * heads, max_position_embeddings=512))


def logits_fn(cfg: ModelConfig):
    return jax.jit(lambda p, t, pos=None, seg=None: forward(
        p, cfg, t, positions=pos, segment_ids=seg).logits)


@pytest.fixture(scope="module")
def setup():
    cfg = make_cfg()
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, cfg.vocab_size)
    return cfg, params, tokens


def test_dense_switch(setup):
    cfg, params, tokens = setup
    dense = logits_fn(make_cfg(off=True))(params, tokens)
    sparse = logits_fn(cfg)(params, tokens)
    assert float(jnp.abs(sparse - dense).max()) > 1e-3  # sparse really differs at T=160
    # key length below dense_len: statically dense, bit-identical
    below = logits_fn(make_cfg(dense_len=T + 1))(params, tokens)
    np.testing.assert_array_equal(below, dense)
    # with a cache of 256 >= dense_len the switch is a lax.cond on max(position)+1 (HF rule)
    cond_cfg = make_cfg(dense_len=T)
    step = jax.jit(lambda p, t, c: forward(p, cond_cfg, t, cache=c).logits)
    np.testing.assert_allclose(step(params, tokens[:, :T - 1], init_cache(cond_cfg, 2, 256)),
                               dense[:, :T - 1], atol=1e-5)
    np.testing.assert_allclose(step(params, tokens, init_cache(cond_cfg, 2, 256)), sparse,
                               atol=1e-5)


def test_all_blocks_selectable_equals_dense(setup):
    cfg, params, tokens = setup
    dense = logits_fn(make_cfg(off=True))(params, tokens)
    wide = make_cfg(topk=T // 16)  # total_topk * block_size >= T
    np.testing.assert_allclose(logits_fn(wide)(params, tokens), dense, atol=1e-5)
    # total_topk = 2 + 1 local = 3 blocks: the first 48 tokens still see every earlier block
    np.testing.assert_allclose(logits_fn(cfg)(params, tokens)[:, :48], dense[:, :48], atol=1e-5)


def _attn_inputs(b=1, t=T, h=4, kv=2, d=16, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, kv, d)),
            jax.random.normal(ks[2], (b, t, kv, d)))


@pytest.mark.parametrize("heads", [4, 8])
def test_attend_gradients_match_reference(heads):
    """The op without and with segment ids (one document) both match the pure-jnp reference,
    values and gradients; G = 2 and G = 8 (the 0.5B group size)."""
    cfg = make_cfg(heads=heads, kv=1 if heads == 8 else 2)
    sc = cfg.sparse_config
    q, k, v = _attn_inputs(h=heads, kv=cfg.num_key_value_heads, d=cfg.head_dim)
    pos = jnp.arange(T)[None]

    def ref(q, k, v):
        idx = infllmv2.select_blocks(q, k, kernel_size=sc.kernel_size, implementation="reference",
                                     kernel_stride=sc.kernel_stride, block_size=sc.block_size,
                                     topk=sc.total_topk, init_blocks=sc.init_blocks,
                                     local_blocks=sc.local_blocks)
        return infllmv2.sparse_attention(q, k, v, idx, block_size=sc.block_size,
                                         implementation="reference")

    def ours(q, k, v, seg):
        return attend(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, cfg=cfg,
                      kv_is_query=True)

    seg = jnp.zeros((1, T), jnp.int32)  # one document: the packed-row layout of the op
    w = jax.random.normal(jax.random.PRNGKey(5), (1, T, heads, cfg.head_dim))
    for fn in (ref, lambda *a: ours(*a, None), lambda *a: ours(*a, seg)):
        out, grads = jax.jit(jax.value_and_grad(lambda *a: (fn(*a) * w).sum(),
                                                argnums=(0, 1, 2)))(q, k, v)
        if fn is ref:
            want_out, want_grads = out, grads
            assert all(float(jnp.abs(g).max()) > 0 for g in grads)
            continue
        np.testing.assert_allclose(out, want_out, rtol=1e-5)
        for g, wg in zip(grads, want_grads):
            np.testing.assert_allclose(g, wg, atol=2e-5)


def test_model_gradients_flow_and_paths_agree(setup):
    cfg, params, tokens = setup

    def loss(p, seg):
        logits = forward(p, cfg, tokens, segment_ids=seg).logits
        return jax.nn.log_softmax(logits)[..., 0].mean()

    g_fast = jax.jit(jax.grad(loss))(params, None)
    g_masked = jax.jit(jax.grad(loss))(params, jnp.zeros_like(tokens))
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_masked)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.abs(g_fast["layers"]["wk"]).max()) > 0


def test_packed_row_equals_documents_alone():
    """Three documents at offsets that are not block or kernel aligned (70 + 90 + 43 tokens),
    G = 4 with 2 KV heads: logits and parameter gradients of the packed row equal those of each
    document alone."""
    cfg = make_cfg(heads=8, kv=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    lens = (70, 90, 43)
    docs = [jax.random.randint(jax.random.PRNGKey(10 + i), (1, n), 0, cfg.vocab_size)
            for i, n in enumerate(lens)]
    tokens = jnp.concatenate(docs, axis=1)
    pos = jnp.concatenate([jnp.arange(n) for n in lens])[None]
    seg = jnp.concatenate([jnp.full((n,), i) for i, n in enumerate(lens)])[None]
    w = jax.random.normal(jax.random.PRNGKey(3), (1, sum(lens), cfg.vocab_size))

    def loss(p, t, w, pos=None, seg=None):
        return (forward(p, cfg, t, positions=pos, segment_ids=seg).logits * w).sum()

    grad = jax.jit(jax.value_and_grad(loss))
    packed, g_packed = grad(params, tokens, w, pos, seg)
    alone, g_alone, at = 0.0, None, 0
    for d in docs:
        value, g = grad(params, d, w[:, at:at + d.shape[1]])
        alone += value
        g_alone = g if g_alone is None else jax.tree.map(jnp.add, g_alone, g)
        at += d.shape[1]
    np.testing.assert_allclose(packed, alone, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_alone)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    logits = logits_fn(cfg)(params, tokens, pos, seg)
    np.testing.assert_allclose(logits[:, 70:160], logits_fn(cfg)(params, docs[1]), atol=2e-5)
    # the second document alone is really sparse (90 tokens = 6 blocks > 4 selected)
    dense = logits_fn(make_cfg(heads=8, kv=2, off=True))(params, docs[1])
    assert float(jnp.abs(logits[:, 70:160] - dense).max()) > 1e-3


def test_dense_len_applies_to_each_document():
    """dense_len = 80 in a 203-token packed row: the 70- and 43-token documents are dense (as
    each is alone, where fewer keys than dense_len make the layer dense), the 90-token one is
    sparse."""
    cfg = make_cfg(dense_len=80)
    params = init_params(cfg, jax.random.PRNGKey(0))
    lens = (70, 90, 43)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (1, sum(lens)), 0, cfg.vocab_size)
    pos = jnp.concatenate([jnp.arange(n) for n in lens])[None]
    seg = jnp.concatenate([jnp.full((n,), i) for i, n in enumerate(lens)])[None]
    packed = logits_fn(cfg)(params, tokens, pos, seg)
    dense_fn, sparse_fn = logits_fn(make_cfg(off=True)), logits_fn(make_cfg())
    for lo, hi, fn in ((0, 70, dense_fn), (70, 160, sparse_fn), (160, 203, dense_fn)):
        np.testing.assert_allclose(packed[:, lo:hi], fn(params, tokens[:, lo:hi]), atol=2e-5)
    assert float(jnp.abs(dense_fn(params, tokens[:, 70:160])
                         - sparse_fn(params, tokens[:, 70:160])).max()) > 1e-3


def test_incremental_kernels_equal_pooling_and_select_like_decode_mode():
    """Kernels kept one key at a time equal pooling the whole cache, and selection from them
    equals the op's decode mode (HF non-causal stage 1) on the prefix, at block edges too."""
    cfg = make_cfg()
    sc = cfg.sparse_config
    q, k, _ = _attn_inputs(b=2, t=T)
    upd = jax.jit(lambda c, t: update_compressed(c, k, jnp.full((2, 1), t), sc))
    kw = dict(kernel_size=sc.kernel_size, kernel_stride=sc.kernel_stride,
              block_size=sc.block_size, topk=sc.total_topk, init_blocks=sc.init_blocks,
              local_blocks=sc.local_blocks)
    select = jax.jit(lambda c, t: infllmv2.select_blocks_at(
        jax.lax.dynamic_slice_in_dim(q, t, 1, axis=1),
        *(jnp.transpose(x, (0, 2, 1, 3)) for x in c), jnp.full((2, 1), t), kv_len=T, **kw))
    comp = init_compressed(sc, 2, T, 2, 16)
    for p in range(T):
        comp = upd(comp, p)
        if p not in (15, 47, 64, 111, T - 1):
            continue
        want = infllmv2.select_blocks(q[:, p:p + 1], k[:, :p + 1], cache_len=p, **kw)
        np.testing.assert_array_equal(select(comp, p), want, err_msg=f"position {p}")
    for got, (size, stride) in zip(comp, [(8, 4), (32, 16)]):
        want = jnp.transpose(pooled_kernels(k, size, stride), (0, 2, 1, 3))
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_decode_token_by_token_equals_full_sequence(setup):
    cfg, params, tokens = setup
    full = logits_fn(cfg)(params, tokens)
    step = jax.jit(lambda p, t, pos, c: forward(p, cfg, t, positions=pos, cache=c))
    prompt = 40
    out = step(params, tokens[:, :prompt], jnp.broadcast_to(jnp.arange(prompt), (2, prompt)),
               init_cache(cfg, 2, T))
    np.testing.assert_allclose(out.logits, full[:, :prompt], atol=2e-5)
    cache = out.cache
    for t in range(prompt, T):
        out = step(params, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=2e-5, err_msg=f"step {t}")
    # the incrementally kept kernels equal pooling the final key cache
    want = jnp.transpose(pooled_kernels(heads_view(cache["k"][0], cfg.head_dim), 8, 4),
                         (0, 2, 1, 3))
    np.testing.assert_allclose(cache["kc1"][0], want, atol=1e-6)


def test_use_nope_rejected(setup):
    _, params, tokens = setup
    with pytest.raises(ConfigError, match="use_nope"):
        forward(params, make_cfg(use_nope=True), tokens)


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr computes, inside scans, conds, remat and custom rules."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _shapes(sub)
    return out


def test_train_step_on_packed_rows_holds_no_t_by_t_value():
    """launch/train.py's step (`make_train_step`, full remat) on a row packed by the data
    pipeline (`row_example`): no value in its jaxpr has two axes of the row's length, with
    dense_len off and with per-document switching; the dense model's step has them."""
    import optax

    from cpmjax.data.pipeline import pack_rows, row_example
    from cpmjax.train.step import init_state, make_train_step

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 97, n) for n in (50, 17, 120, 33)]
    tokens, doc_ids = pack_rows(docs, T)
    batch = {k: jnp.asarray(v)[None] for k, v in row_example(tokens[0], doc_ids[0]).items()}
    assert int(batch["segment_ids"].max()) >= 3  # several documents in the row
    tx = optax.adamw(1e-3)

    def t_by_t(cfg):
        state = init_state(cfg, tx, jax.random.PRNGKey(0))
        jaxpr = jax.make_jaxpr(make_train_step(cfg, tx, remat="full"))(state, batch).jaxpr
        return [s for s in _shapes(jaxpr) if s.count(T) >= 2]

    assert t_by_t(make_cfg()) == [] and t_by_t(make_cfg(dense_len=64)) == []
    assert t_by_t(make_cfg(off=True))  # the dense step's [B, T, T] mask and scores
