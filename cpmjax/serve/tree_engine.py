"""The decode engine with tree speculative decoding (``cpmjax.serve.tree``) and measured switching
among step kinds: the configured tree, chains of every length up to its depth, and a plain step.

Same JetStream contract, static shapes and draft prefill as :class:`SpeculativeEngine`. Every
step kind emits each row's tokens by the coupled rule (the tokens plain decoding draws with the
row's seed), so which kind runs, chosen per step by :class:`StepCostPolicy` from measured costs
at the current batch size, changes the speed and never the output, and a seeded request's tokens
do not depend on its batch companions. When every busy row is greedy a chain kind runs the
chain engine's own round (causal attention, no tree masks or compaction): its tokens are the
target's argmaxes as well. The chain lengths are EAGLE-3/-4-style draft-length selection from
measured costs: at batch 1 on this CPU the bench's k=3 chain row (1.58x plain decoding) beat
the measured row that ran mostly the depth-4 chain, then the only chain (1.46x; ``launch/bench.py
decode_tree``, 2026-12-07 23:57).

The plain step runs the target alone (its ordinary attention: also InfLLM v2 sparse attention)
and leaves the draft behind: the (target hidden, next token) pairs it would have read are kept
per slot (up to ``pending`` of them) and the draft layer reads them in one pass before the next
speculative round, or when the buffer is full. So a plain step costs what the plain engine's
does, plus one draft pass per ``pending`` steps.

Tree rounds attend through an explicit mask (`cpmjax.model.transformer.TreeAttention`); under
InfLLM v2 each node attends as one-token decoding at its position would
(`cpmjax.sparse.attend.sparse_tree_attend`), deciding dense or sparse mode from its own
position, so a sparse model speculates at any length (the chain rounds' verification decides
per position too: ``forward(stepwise=True)``).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model import forward
from cpmjax.model.mtp import draft_feature, mtp_block
from cpmjax.model.params import Params
from cpmjax.quant.qforward import dense_draft, layer_transform_for
from cpmjax.serve.engine import DecodeState, sampling_kwargs
from cpmjax.serve.sampling import sample
from cpmjax.serve.spec_engine import SpeculativeEngine
from cpmjax.serve.speculative import DraftCache, RowSampling, draft_kv, init_draft_cache, with_kv
from cpmjax.serve.step_policy import StepCostPolicy
from cpmjax.serve.tree import RULES, TreeShape, check_tree_shape, tree_round
from cpmjax.sparse.attend import check_tree_depth

POLICIES = ("measured", "fixed")
PLAIN = TreeShape(0, 1, 0)


class TreeEngine(SpeculativeEngine):
    """Speculative engine whose rounds draft a tree of ``tree`` = (depth, topk, size).

    ``policy``: ``"measured"`` switches per step among the tree, chains of every length up to
    its depth and a plain step (`StepCostPolicy`); ``"fixed"`` always runs the tree. ``rule``:
    the acceptance rule (``cpmjax.serve.tree.RULES``); with ``"rejection"`` a sampled row's
    tokens depend on the round structure, so while any busy row samples the tree always runs.
    ``pending``: plain steps the draft may fall behind before it catches up.
    """

    def __init__(self, cfg: ModelConfig, draft_params: Params, *, tree: Any = (4, 4, 16),
                 policy: str = "measured", rule: str = "coupled", pending: int = 64,
                 **kw: Any) -> None:
        shape = check_tree_shape(tree)
        if shape.depth < 1:
            raise ValueError(f"tree depth must be >= 1 (a plain engine drafts nothing), got "
                             f"{shape.depth}")
        if cfg.sparse_config is not None:
            check_tree_depth(cfg.sparse_config, shape.depth)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not isinstance(pending, (int, np.integer)) or pending < 1:
            raise ValueError(f"pending must be an integer >= 1, got {pending!r}")
        chains = [TreeShape(d, 1, d) for d in range(shape.depth, 0, -1)]
        kinds = [shape] + ([c for c in chains if c != shape] if policy == "measured" else [])
        self.kinds, self.rule, self.pending = tuple(kinds + [PLAIN]), rule, int(pending)
        self.policy_name = policy
        super().__init__(cfg, draft_params, k=shape.depth, **kw)
        self.speculative_k = max(s.lookahead for s in self.kinds)  # slots a step may write ahead
        self.policy = StepCostPolicy(len(self.kinds))
        self._tree = self._jit("tree", self._tree_impl, donate=(2,), static=(3, 4, 5))
        self._plain = self._jit("plain", self._plain_impl, donate=(1,), static=(2,))
        self._catch_up_step = self._jit("catch_up", self._catch_up_impl, donate=(2,),
                                        static=(3,))
        # per slot, plain steps since the draft last read its pairs (0 once a request is
        # inserted): a bound on each row's pending count kept on the host, so that a plain step
        # needs no on-device test of a full buffer and a catch-up runs only when a live row has
        # pairs pending
        self._behind = np.zeros(self.max_slots, np.int64)
        self._live = np.zeros(self.max_slots, bool)
        self._timed: set[tuple[Any, ...]] = set()  # step variants compiled already
        self._last_kind: int | None = None  # the kind of the step before
        self.kind_names = tuple("plain" if s == PLAIN else f"chain{s.depth}" if _is_chain(s)
                                else "tree" for s in self.kinds)
        self._chains = tuple((i, s.depth) for i, s in enumerate(self.kinds) if _is_chain(s))
        self.steps_by_kind = dict.fromkeys(self.kind_names, 0)

    def speculation(self) -> dict[str, Any]:
        return {**super().speculation(), "method": "tree", "k": None,
                "tree": dict(self.kinds[0]._asdict()), "policy": self.policy_name,
                "rule": self.rule, "steps_by_kind": dict(self.steps_by_kind)}

    # ---- the draft's pending pairs ---------------------------------------------------------
    def _with_pending(self, draft: DraftCache, batch: int) -> DraftCache:
        return {**draft, "pend_h": jnp.zeros((batch, self.pending, self.cfg.hidden_size),
                                             jnp.float32),
                "pend_tok": jnp.zeros((batch, self.pending), jnp.int32),
                "pend_n": jnp.zeros((batch,), jnp.int32)}

    def _init_prefix_draft(self) -> DraftCache:
        return self._with_pending(init_draft_cache(self.cfg, 1, self.max_len, self.dtype), 1)

    def init_decode_state(self) -> DecodeState:
        state = super().init_decode_state()
        self._behind[:], self._live[:] = 0, False
        return state._replace(draft=self._with_pending(state.draft, self.max_slots))

    def insert(self, params: Params, prefix: Any, state: DecodeState, slot: int,
               *args: Any, **kw: Any) -> tuple[DecodeState, jax.Array]:
        out = super().insert(params, prefix, state, slot, *args, **kw)
        self._behind[slot], self._live[slot] = 0, True  # the prefix's draft has none pending
        return out

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        out = super().release(state, slot)
        self._live[slot] = False
        return out

    def _catch_up_impl(self, params: Params, draft_args: Any, state: DecodeState, kv_len: int
                       ) -> DecodeState:
        """The draft layer reads every row's pending pairs (positions length - n .. length-1) in
        one pass. A separate step the host runs when some row has pairs pending (it counts the
        plain steps), not a ``lax.cond`` inside the steps: on CPU a conditional around the draft
        cache cost a plain step about 9% (measured at batch 8 on the tiny model)."""
        d = state.draft
        n = d["pend_n"]
        i = jnp.arange(self.pending)[None]
        pos = jnp.where((i < n[:, None]) & (state.lengths >= 0)[:, None],
                        state.lengths[:, None] - n[:, None] + i, -1)
        hc, kv = mtp_block(dense_draft(draft_args["params"], self.cfg, self.dtype), params,
                           self.cfg, d["pend_h"].astype(self.dtype), d["pend_tok"], pos,
                           cache_kv=draft_kv(d), kv_len=kv_len)
        h = jnp.where((n > 0)[:, None], hc[jnp.arange(n.shape[0]), jnp.maximum(n - 1, 0)],
                      d["h"])
        return state._replace(draft={**with_kv(d, kv, h.astype(d["h"].dtype)),
                                     "pend_n": jnp.zeros_like(n)})

    # ---- the step kinds -----------------------------------------------------------------
    def _tree_impl(self, params: Params, draft_args: Any, state: DecodeState, kv_len: int,
                   shape: TreeShape, all_greedy: bool
                   ) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array | None]:
        r = tree_round(params, draft_args["params"], self.cfg, shape, state.cache, state.draft,
                       state.tokens, state.lengths, state.seed, state.steps,
                       RowSampling(state.temperature, state.top_k, state.top_p),
                       draft_args["vocab_ids"], self.dtype, all_greedy, kv_len, self.draft_form,
                       self.rule, draft_args.get("head"))
        new, tokens, count = self._advance(state, r)
        return new, tokens, count, r.chain

    def _plain_impl(self, params: Params, state: DecodeState, kv_len: int
                    ) -> tuple[DecodeState, jax.Array, jax.Array]:
        """One target step (its own attention kernels) sampled as the plain engine samples
        (``cpmjax.serve.sampling.sample``; the penalties, biases and masks it also applies are
        refused for speculative engines, so they are neutral here); the draft's pair is kept
        pending."""
        active = state.lengths >= 0
        draft = state.draft
        out = forward(params, self.cfg, state.tokens[:, None], positions=state.lengths[:, None],
                      cache=state.cache, dtype=self.dtype, kv_len=kv_len, **self.kernels,
                      layer_transform=layer_transform_for(params, self.cfg, self.dtype))
        nxt = sample(out.logits[:, 0].astype(jnp.float32), state.seen, state.steps,
                     **sampling_kwargs(state, None))
        rows, n = jnp.arange(self.max_slots), draft["pend_n"]
        feature = draft_feature(params, self.cfg, out.hidden[:, 0], self.draft_form)
        slot = jnp.where(active, n, self.pending)  # idle rows (and a full buffer) write nothing
        draft = {**draft,
                 "pend_h": draft["pend_h"].at[rows, slot].set(feature.astype(jnp.float32),
                                                              mode="drop"),
                 "pend_tok": draft["pend_tok"].at[rows, slot].set(nxt, mode="drop"),
                 "pend_n": jnp.where(active, n + 1, n)}
        count = active.astype(jnp.int32)
        new = state._replace(cache=out.cache, draft=draft, tokens=jnp.where(active, nxt,
                                                                            state.tokens),
                             lengths=jnp.where(active, state.lengths + 1, -1),
                             steps=state.steps + count)
        return new, nxt[:, None], count

    def generate(self, params: Params, state: DecodeState, all_greedy: bool = False,
                 context: int | None = None) -> tuple[DecodeState, jax.Array, jax.Array]:
        """One step of the kind the policy picks (see the module docstring); arguments as for
        :meth:`SpeculativeEngine.generate`."""
        measured = self.policy_name == "measured"
        # the busy rows as the host recorded them (insert/release): reading the device's
        # lengths took ~20 us a step, ~1% of a batch-8 plain step of the tiny model here
        active = self._live.copy() if measured else None
        busy = int(active.sum()) if measured else 0
        kind = self._choose(busy, all_greedy, context)
        shape = self.kinds[kind]
        self.steps_by_kind[self.kind_names[kind]] += 1
        # a plain step writes no scratch slots past the newest token: it reads the span a plain
        # engine would (with kv buckets, one bucket fewer near a bucket's end)
        span = (self.kv_span(context) if shape != PLAIN or context is None
                else self._span(context))
        # the draft reads the pairs plain steps left pending before a round, and when a plain
        # step would overflow them; that pass's time is the cost of plain steps, not the round's
        behind = int(self._behind[self._live].max(initial=0))
        catch_up = behind >= self.pending if shape == PLAIN else behind > 0
        deferred = 0.0
        if catch_up:
            state, deferred = self._read_pending(params, state, span, wait=measured)
        start = time.perf_counter()
        chain = None  # a tree round's count of what the chain kind would have emitted
        if shape == PLAIN:
            # not the draft's weights: 20 fewer arguments to hand over (~25 us a batch-8 step)
            out = self._plain(params, state, span)
            self._behind += 1
        elif all_greedy and _is_chain(shape):
            # every row greedy: the chain engine's causal round emits the same argmax tokens
            # without the tree path's masks and compaction (1.26 vs 1.88 ms a round at batch 1)
            out = self._greedy_generate(params, self._round_args(params), state, span,
                                        shape.depth)
        else:
            *out, chain = self._tree(params, self._round_args(params), state, span, shape,
                                     all_greedy)
            out = tuple(out)
        if not measured:
            return out
        counts = np.asarray(out[2])  # waits for the step
        seconds = time.perf_counter() - start + (deferred if shape == PLAIN else 0.0)
        slowest = int(counts[active].min()) if busy else 0
        # each chain kind's tokens on these very rows and positions, read off a tree round or
        # a longer chain's round (a chain of depth d emits their first-child chain cut at
        # d + 1): a paired estimate of its acceptance (its own steps ran on other requests)
        if not busy or shape == PLAIN:
            slowest_chain, reach = None, 0
        elif _is_chain(shape):
            slowest_chain, reach = slowest, shape.depth - 1  # shorter chains only
        else:
            slowest_chain, reach = int(np.asarray(chain)[active].min()), shape.depth
        paired = None if slowest_chain is None else {
            i: min(slowest_chain, d + 1) for i, d in self._chains if d <= reach} or None
        # not a cost measurement: a step's first run at its static arguments (it compiles), and
        # the first step of a kind after another kind ran: on CPU it took 20-35% longer than
        # the next ones (its executable and buffers cold; interleaved timings of the tiny
        # model at batch 1), which biased every 2-step re-try against the re-tried kind
        key = (shape, span, catch_up) if shape == PLAIN else (shape, span, all_greedy)
        if key in self._timed and kind == self._last_kind:
            self.policy.record(kind, busy, seconds, slowest, paired)
        self._timed.add(key)
        self._last_kind = kind
        return out

    def _read_pending(self, params: Params, state: DecodeState, span: int, wait: bool
                      ) -> tuple[DecodeState, float]:
        """The state after the draft read its pending pairs, and the seconds that took (0.0
        unless ``wait``)."""
        start = time.perf_counter()
        state = self._catch_up_step(params, self.draft_args, state, span)
        self._behind[:] = 0
        if not wait:
            return state, 0.0
        return jax.block_until_ready(state), time.perf_counter() - start

    def _choose(self, busy: int, all_greedy: bool, context: int | None) -> int:
        """The configured tree, or the policy's choice where switching cannot change any
        output."""
        if self.policy_name == "fixed" or (self.rule == "rejection" and not all_greedy):
            return 0
        return self.policy.choose(busy)


def _is_chain(shape: TreeShape) -> bool:
    """Whether ``shape`` drafts one token per depth (topk 1): a chain, verified causally."""
    return shape != PLAIN and shape.topk == 1 and shape.size == shape.depth
