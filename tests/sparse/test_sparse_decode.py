"""InfLLM v2 decode through a KV cache: the cached path reads only the selected blocks.

Rows at different lengths in one batch, token-by-token and k+1-token (speculative verification)
steps, against the full-sequence forward and the static op on each row's prefix; every stage-2
implementation of the registry that runs here; compiled-HLO checks that no value as wide as the
cache is computed and that compressed-key updates cost O(new tokens); the dense/sparse switch
per slot, so a request's output does not depend on its batch companions.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.model import forward, init_cache, init_params
from kernels.infllmv2.layout import heads_view
from cpmjax.serve.engine import DecodeEngine
from cpmjax.serve.scheduler import Scheduler
from cpmjax.sparse import sparse_attend
from cpmjax.sparse.cache import init_compressed, update_compressed
from cpmjax.sparse.scale_check import materialized
from kernels import infllmv2
from kernels.infllmv2.selection import pooled_kernels
from tests.sparse.test_sparse_model import T, logits_fn, make_cfg

LENS = (40, 57)  # prompt lengths of the two rows


@pytest.fixture(scope="module")
def model():
    cfg = make_cfg()
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, cfg.vocab_size)
    return cfg, params, tokens, logits_fn(cfg)(params, tokens)


@pytest.mark.parametrize("step_len", [1, 4])
def test_ragged_decode_equals_full_sequence(model, step_len):
    """Prefill rows of 40 and 57 tokens (the short one padded with position -1), then feed
    ``step_len`` tokens per row per call at each row's own positions: every logit equals the
    full-sequence forward (fast op) at that position."""
    cfg, params, tokens, full = model
    step = jax.jit(lambda p, t, pos, c: forward(p, cfg, t, positions=pos, cache=c))
    lens = jnp.asarray(LENS)
    width = max(LENS)
    pos = jnp.where(jnp.arange(width) < lens[:, None], jnp.arange(width), -1)
    out = step(params, tokens[:, :width], pos, init_cache(cfg, 2, T))
    for r, n in enumerate(LENS):
        np.testing.assert_allclose(out.logits[r, :n], full[r, :n], atol=2e-5)
    cache, rows = out.cache, jnp.arange(2)[:, None]
    for i in range(0, T - width - step_len + 1, step_len):
        pos = lens[:, None] + i + jnp.arange(step_len)
        out = step(params, tokens[rows, pos], pos, cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits, full[rows, pos], atol=2e-5, err_msg=f"step {i}")


def _layer_inputs(cfg, s: int, q_pos: jax.Array, seed: int = 0):
    """Random q and a full random cache (junk after each row's position), its kernels."""
    b, tq = q_pos.shape
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, h, d))
    k, v = (jax.random.normal(x, (b, s, kvh, d)) for x in ks[1:])
    comp = update_compressed(init_compressed(cfg.sparse_config, b, s, kvh, d), k,
                             jnp.broadcast_to(jnp.arange(s), (b, s)), cfg.sparse_config)
    return q, k, v, comp


def _attend(cfg, compressed, q, k, v, q_pos, implementation: str = "auto"):
    """One layer's sparse attention into the cache (dense_len -1 in these configs)."""
    return sparse_attend(q, k, v, q_pos=q_pos, q_seg=None, cfg=cfg, dense=None,
                         kv_is_query=False, compressed=compressed,
                         implementation=implementation)


def _per_row_oracle(cfg, q, k, v, q_pos):
    """Each row alone through the static op's jnp reference on its prefix."""
    sc = cfg.sparse_config
    rows = []
    for b, p in enumerate(np.asarray(q_pos[:, 0])):
        n = p + q.shape[1]
        idx = infllmv2.select_blocks(
            q[b:b + 1], k[b:b + 1, :n], kernel_size=sc.kernel_size,
            kernel_stride=sc.kernel_stride, block_size=sc.block_size, topk=sc.total_topk,
            init_blocks=sc.init_blocks, local_blocks=sc.local_blocks, cache_len=int(p),
            implementation="reference")
        rows.append(infllmv2.sparse_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], idx,
                                              block_size=sc.block_size, cache_len=int(p),
                                              implementation="reference"))
    return jnp.concatenate(rows)


STAGE2_HERE = [n for n in infllmv2.ATTENTION.names if n not in ("pallas_tpu", "pallas_gpu")]


@pytest.mark.parametrize("heads,kv,impls", [(4, 2, STAGE2_HERE), (8, 1, ["xla"])])
def test_cached_path_equals_each_row_alone(heads, kv, impls):
    """k+1 = 4 queries per row at different positions of a 300-key cache with junk after them:
    the stage-2 implementations equal the reference on each row's prefix alone."""
    cfg = make_cfg(heads=heads, kv=kv)
    q_pos = jnp.asarray([[20, 21, 22, 23], [131, 132, 133, 134], [290, 291, 292, 293]])
    q, k, v, comp = _layer_inputs(cfg, 300, q_pos)
    want = _per_row_oracle(cfg, q, k, v, q_pos)
    for impl in impls:
        got = jax.jit(lambda *a: _attend(cfg, comp, *a, implementation=impl))(q, k, v, q_pos)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=impl)
    dense = infllmv2.sparse_attention_at(q, k, v, jnp.broadcast_to(
        jnp.arange(19), (3, kv, 4, 19)), q_pos, block_size=16)  # every block: dense attention
    assert float(jnp.abs(want[2] - dense[2]).max()) > 1e-3  # 19 blocks, 4 read: really sparse


_INSTR = re.compile(r"= \w+\[([\d,]*)\]\S* (\S+?)\(")


def _cache_wide(hlo: str, s: int) -> list[str]:
    """Instructions, other than parameters, with a dimension of size s (fused ones included)."""
    return [line.strip() for line in hlo.splitlines()
            if (m := _INSTR.search(line)) and str(s) in m.group(1).split(",")
            and m.group(2) != "parameter"]


@pytest.mark.parametrize("tq", [1, 4])
def test_cached_attention_computes_nothing_cache_wide(tq):
    """The compiled decode attention of one layer (selection + stage 2) has no score or mask as
    wide as the cache and writes no copy of it; the dense-masked reference implementation has
    both (so the check can fail)."""
    cfg = make_cfg()
    s = 2004  # not a multiple of the block size: the block layout pads, inside the gather
    q_pos = jnp.asarray([[5 + t for t in range(tq)], [1500 + t for t in range(tq)]])
    q, k, v, comp = _layer_inputs(cfg, s, q_pos)
    cache_size = k.size

    def hlo(impl: str):
        fn = jax.jit(lambda *a: _attend(cfg, comp, *a, implementation=impl))
        return fn.lower(q, k, v, q_pos).compile().as_text()

    cached, masked = hlo("xla"), hlo("reference")
    assert _cache_wide(cached, s) == []
    assert materialized(cached, cache_size) == []
    assert len(_cache_wide(masked, s)) > 0
    assert len(materialized(masked, cache_size)) > 0


def test_model_decode_step_takes_the_cached_path(model):
    """The model's cached step calls the per-row ops; a packed-row forward does not."""
    cfg, params, tokens, _ = model
    cache = init_cache(cfg, 2, T)
    step = jax.make_jaxpr(lambda t, pos: forward(params, cfg, t, positions=pos, cache=cache).logits)
    text = str(step(tokens[:, :1], jnp.full((2, 1), 7)))
    assert "select_blocks_at" in text and "sparse_attention_at" in text
    packed = jax.make_jaxpr(lambda t: forward(params, cfg, t,
                                              segment_ids=jnp.zeros_like(t)).logits)(tokens)
    assert "sparse_attention_at" not in str(packed)


def test_multi_token_writes_update_only_their_kernels():
    """Prefill chunks of 7 (padded tail), a 4-token verification step and a rewrite of rejected
    positions: the kept kernels equal pooling the final keys, and the compiled update of an
    8-token write does the same work for a 1K and a 16K cache (no re-pooling of the cache)."""
    sc = make_cfg().sparse_config
    keys = jax.random.normal(jax.random.PRNGKey(0), (2, 100, 2, 16))
    upd = jax.jit(lambda c, k, p: update_compressed(c, k, p, sc))
    comp, cache = init_compressed(sc, 2, 100, 2, 16), jnp.zeros_like(keys)
    writes = [np.arange(a, a + 7) for a in range(0, 63, 7)]
    writes[-1][5:] = -1  # padded tail chunk: positions 56..60
    writes += [np.arange(61, 65), np.arange(61, 69), np.arange(61, 70)]  # verify, reject, redo
    junk_step = len(writes) - 2  # row 0 writes a draft's keys, then rewrites them
    rows = np.arange(2)[:, None]
    for step, pos in enumerate(writes):
        pos = jnp.asarray(np.stack([pos, pos if step != junk_step else np.full_like(pos, -1)]))
        new = keys if step != junk_step else jax.random.normal(jax.random.PRNGKey(1), keys.shape)
        cache = cache.at[rows, jnp.where(pos >= 0, pos, 100)].set(new[rows, jnp.maximum(pos, 0)],
                                                                   mode="drop")
        comp = upd(comp, cache, pos)
    for got, (size, stride) in zip(comp, [(8, 4), (32, 16)]):
        want = jnp.transpose(pooled_kernels(keys[:, :70], size, stride), (0, 2, 1, 3))
        np.testing.assert_allclose(got[:, :want.shape[1]], want, atol=1e-6)

    def flops(s: int) -> float:
        c = init_compressed(sc, 2, s, 2, 16)
        k = jax.ShapeDtypeStruct((2, s, 2, 16), jnp.float32)
        p = jax.ShapeDtypeStruct((2, 8), jnp.int32)
        return upd.lower(c, k, p).compile().cost_analysis()["flops"]

    assert flops(1024) == flops(16384)
    pool = lambda s: jax.jit(lambda k: pooled_kernels(k, 8, 4)).lower(  # noqa: E731
        jax.ShapeDtypeStruct((2, s, 2, 16), jnp.float32)).compile().cost_analysis()["flops"]
    assert pool(16384) > 8 * pool(1024)  # what re-pooling the cache would cost


def test_dense_or_sparse_is_decided_per_slot():
    """dense_len 64: a 40-token prompt (dense for its whole life) gives the same tokens alone
    and next to a 100-token one (sparse); both equal their engine-of-one outputs, and the short
    one's equal the dense model's (an always-sparse model would differ, so the check can
    fail)."""
    cfg, off, always = make_cfg(dense_len=64), make_cfg(off=True), make_cfg()
    params = jax.tree.map(lambda x: x * 3, init_params(cfg, jax.random.PRNGKey(1),
                                                       parametrization="standard"))
    short, long = list(range(3, 43)), [int(t) % 90 + 3 for t in range(7, 107)]

    def run(engine, *prompts):
        sched = Scheduler(engine, params)
        reqs = [sched.submit(p, 10, stop_token_ids=[]) for p in prompts]
        sched.run_until_done()
        return [r.output for r in reqs]

    engine = DecodeEngine(cfg, max_slots=2, max_len=128, chunk=16)
    together = run(engine, short, long)
    assert together == [run(engine, short)[0], run(engine, long)[0]]
    dense, sparse = (DecodeEngine(c, max_slots=1, max_len=128, chunk=16) for c in (off, always))
    assert together[0] == run(dense, short)[0] != run(sparse, short)[0]



def test_speculative_decoding_keeps_both_kernel_caches():
    """A sparse model with its MTP draft (k=3): greedy outputs equal plain decoding (lossless),
    and the kernels of the target's and the draft's caches, kept through verification and
    catch-up writes, equal pooling the keys each cache holds."""
    from cpmjax.model.mtp import init_mtp_params
    from cpmjax.serve.spec_engine import SpeculativeEngine
    from cpmjax.sparse.cache import n_kernels

    cfg = make_cfg()
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompt = list(range(5, 75))
    plain = DecodeEngine(cfg, max_slots=1, max_len=128, chunk=16)
    spec = SpeculativeEngine(cfg, init_mtp_params(cfg, jax.random.PRNGKey(1)), k=3, max_slots=1,
                             max_len=128, chunk=16)
    outs = []
    for eng in (plain, spec):
        state, first = eng.insert(params, eng.prefill(params, prompt), eng.init_decode_state(), 0)
        toks = [int(first)]
        while len(toks) < 20:
            state, new, count = eng.generate(params, state, all_greedy=True)
            toks += np.asarray(new[0, :int(count[0])]).tolist()
        outs.append(toks[:20])
    assert outs[0] == outs[1]
    n = int(state.lengths[0])  # both caches hold positions 0..n-1 (speculative.py)
    for keys, kc1 in ((state.cache["k"][0], state.cache["kc1"][0]),  # layer 0 of the target
                      (state.draft["k"], state.draft["kc1"])):
        want = jnp.transpose(pooled_kernels(heads_view(keys[:, :n], cfg.head_dim), 8, 4),
                             (0, 2, 1, 3))
        np.testing.assert_allclose(kc1[:, :n_kernels(n, 8, 4)], want, atol=1e-6)


def test_stepwise_verification_decides_the_mode_per_position():
    """Six tokens checked at once at positions 60..65 with dense_len 64: ``stepwise`` gives each
    position the logits of one-token decoding there (dense through 62, sparse from 63); one
    mode for the whole call (HF's prefill rule) does not."""
    cfg = make_cfg(dense_len=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(1), (1, 128), 0, cfg.vocab_size)
    cache = forward(params, cfg, toks[:, :60], positions=jnp.arange(60)[None],
                    cache=init_cache(cfg, 1, 128)).cache
    pos = jnp.arange(60, 66)[None]
    at_once = {s: forward(params, cfg, toks[:, 60:66], positions=pos, cache=cache,
                          stepwise=s).logits[0] for s in (True, False)}
    c, one = cache, []
    for p in range(60, 66):
        out = forward(params, cfg, toks[:, p:p + 1], positions=jnp.asarray([[p]]), cache=c)
        c = out.cache
        one.append(out.logits[0, 0])
    one = np.stack(one)
    np.testing.assert_allclose(at_once[True], one, atol=2e-5)
    assert np.abs(np.asarray(at_once[False][:3]) - one[:3]).max() > 1e-3
