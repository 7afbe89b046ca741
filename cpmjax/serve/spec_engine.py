"""The decode engine with speculative sampling: each step drafts k tokens per slot with the
MTP/EAGLE head and verifies them in one target forward (``cpmjax.serve.speculative``).

Same JetStream contract and static shapes as :class:`DecodeEngine`, so the scheduler, the server and
``generate`` run it unchanged; slots join and leave between steps and each slot accepts its own
number of tokens per step. The draft is kept in step with the prompt during prefill (its layer
reads every (target hidden, next token) pair of the prompt but the last, whose next token is
sampled at insert, which then reads it), and its cache lives in the decode state next to the
target's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model.mtp import check_draft_form, draft_feature, mtp_block
from cpmjax.model.params import Params
from cpmjax.quant.qforward import dense_draft
from cpmjax.serve.engine import DecodeEngine, DecodeState
from cpmjax.serve.sampling import SamplingParams, row_keys
from cpmjax.serve.frspec import check_frspec_ids, frspec_head
from cpmjax.serve.tree import check_tree_shape
from cpmjax.serve.speculative import (RoundOut, RowSampling, draft_kv, init_draft_cache,
                                      speculative_round, with_kv)


class SpeculativeEngine(DecodeEngine):
    """:class:`DecodeEngine` whose ``generate`` step is one speculative round of draft length k.

    ``frspec_ids`` (optional) restricts the draft's output head to those tokens (FR-Spec);
    verification always uses the full vocabulary, so outputs are those of the target alone.
    ``draft_form`` is how the head meets the target (``cpmjax.model.mtp.DRAFT_FORMS``), fixed
    for the engine's compiled steps.
    """

    def __init__(self, cfg: ModelConfig, draft_params: Params, *, k: int = 3,
                 frspec_ids: Any = None, draft_form: str = "mtp", **kw: Any) -> None:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"draft length k must be an integer >= 1, got {k!r}")
        self.draft_form = check_draft_form(draft_form)
        super().__init__(cfg, **kw)
        self.speculative_k = int(k)
        self.chain_k = int(k)  # the chain round's draft length (a subclass may look further)
        self._greedy_generate = self._jit("generate_greedy", self._greedy_generate_impl,
                                          donate=(2,), static=(3, 4))
        self.set_draft(draft_params, frspec_ids)

    def speculation(self) -> dict[str, Any]:
        ids = self.draft_args["vocab_ids"]
        return {"method": "chain", "k": self.chain_k, "draft_form": self.draft_form,
                "frspec_size": None if ids is None else int(ids.shape[0])}

    def set_draft(self, draft_params: Params, frspec_ids: Any = None) -> None:
        """Use these draft weights (and FR-Spec ids) from the next step on; a draft of the same
        shapes reuses the compiled steps. Swap only between requests, never while slots decode."""
        ids = None if frspec_ids is None else jnp.asarray(
            check_frspec_ids(frspec_ids, self.cfg.vocab_size))
        self.draft_args = {"params": draft_params, "vocab_ids": ids}
        self._head: tuple[Any, jax.Array] | None = None  # (source weight, FR-Spec head)

    def _round_args(self, params: Params) -> dict[str, Any]:
        """``draft_args`` for a drafting step over ``params``: with FR-Spec, plus ``"head"``,
        the head's weight (`frspec_head`), gathered again only when the target's output
        projection is another array (jax arrays are immutable, so identity is enough)."""
        ids = self.draft_args["vocab_ids"]
        if ids is None:
            return self.draft_args
        source = params["embed" if self.cfg.tie_word_embeddings else "lm_head"]
        if self._head is None or self._head[0] is not source:
            self._head = (source, frspec_head(params, self.cfg, ids))
        return {**self.draft_args, "head": self._head[1]}

    def check_sampling(self, sampling: SamplingParams) -> None:
        if sampling.repetition_penalty != 1.0:
            raise ValueError("speculative decoding does not support repetition_penalty != 1 "
                             "(the penalty would change within a verified chain); got "
                             f"{sampling.repetition_penalty}")

    # ---- prefill: keep the draft in step with the prompt ---------------------------------
    def _init_prefix_draft(self) -> dict[str, jax.Array]:
        return init_draft_cache(self.cfg, 1, self.max_len, self.dtype)

    def _draft_prefill(self, params: Params, draft_args: Any, draft: Any,
                       hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array,
                       last: jax.Array, kv_len: int) -> dict[str, jax.Array]:
        """Draft layer over (hidden at i, token i+1) for the chunk's positions, except the
        prompt's last (its next token, -1 here, is not sampled yet); remembers the draft feature
        at the chunk's last token (the prompt's last, once the final chunk ran)."""
        pos = jnp.where(next_tokens >= 0, positions, -1)
        feature = draft_feature(params, self.cfg, hidden, self.draft_form)
        _, kv = mtp_block(dense_draft(draft_args["params"], self.cfg, self.dtype), params,
                          self.cfg, feature, jnp.maximum(next_tokens, 0), pos,
                          cache_kv=draft_kv(draft), kv_len=kv_len)
        return with_kv(draft, kv, feature[:, last].astype(jnp.float32))

    def _draft_insert(self, params: Params, draft_args: Any, prefix_draft: Any, first: jax.Array,
                      length: jax.Array) -> dict[str, jax.Array]:
        """The draft reads the prompt's last pair (its hidden state, the first sampled token);
        its output is the feature the first round's first proposal comes from."""
        h, kv = mtp_block(dense_draft(draft_args["params"], self.cfg, self.dtype), params,
                          self.cfg, prefix_draft["h"][:, None].astype(self.dtype),
                          first[None, None], (length - 1)[None, None],
                          cache_kv=draft_kv(prefix_draft))
        return with_kv(prefix_draft, kv, h[:, 0].astype(jnp.float32))

    def init_decode_state(self) -> DecodeState:
        return super().init_decode_state()._replace(
            draft=init_draft_cache(self.cfg, self.max_slots, self.max_len, self.dtype))

    # ---- generate: one speculative round -------------------------------------------------
    def _generate_impl(self, params: Params, draft_args: Any, state: DecodeState, kv_len: int,
                       all_greedy: bool = False, k: int | None = None
                       ) -> tuple[DecodeState, jax.Array, jax.Array]:
        """One chain round of draft length ``k`` (None: the engine's ``chain_k``)."""
        keys = row_keys(state.seed, state.steps)
        r = speculative_round(params, draft_args["params"], self.cfg, k or self.chain_k,
                              state.cache, state.draft, state.tokens, state.lengths, keys,
                              RowSampling(state.temperature, state.top_k, state.top_p),
                              draft_args["vocab_ids"], self.dtype, all_greedy, kv_len,
                              self.kernels, self.draft_form, draft_args.get("head"))
        return self._advance(state, r)

    @staticmethod
    def _advance(state: DecodeState, r: RoundOut) -> tuple[DecodeState, jax.Array, jax.Array]:
        """The decode state after a round, and the round's (tokens, counts)."""
        active = state.lengths >= 0
        new = state._replace(cache=r.cache, draft=r.draft, tokens=r.last,
                             lengths=jnp.where(active, state.lengths + r.count, -1),
                             steps=state.steps + r.count)
        return new, r.tokens, r.count

    def _greedy_generate_impl(self, params: Params, draft_args: Any, state: DecodeState,
                              kv_len: int, k: int) -> tuple[DecodeState, jax.Array, jax.Array]:
        """A chain round of draft length ``k`` (static: a subclass runs several) over rows that
        are all greedy."""
        return self._generate_impl(params, draft_args, state, kv_len, all_greedy=True, k=k)

    def generate(self, params: Params, state: DecodeState, all_greedy: bool = False,
                 context: int | None = None) -> tuple[DecodeState, jax.Array, jax.Array]:
        """One speculative round; ``all_greedy`` (every busy slot at temperature 0, known to the
        scheduler) runs the argmax-only variant, compiled once per span on first use;
        ``context`` as for :meth:`DecodeEngine.generate`."""
        args, span = self._round_args(params), self.kv_span(context)
        if all_greedy:
            return self._greedy_generate(params, args, state, span, self.chain_k)
        return self._generate(params, args, state, span)


@dataclasses.dataclass(frozen=True, eq=False)
class Speculative:
    """Speculative decoding settings for ``cpmjax.serve.generate`` and :func:`make_engine`: the
    MTP/EAGLE draft head's params (``cpmjax.model.mtp``), the draft length k, an optional
    FR-Spec id list and the head's form (``cpmjax.model.mtp.DRAFT_FORMS``). With ``tree``
    (depth, topk, size) the rounds draft EAGLE-2 trees (``cpmjax.serve.tree_engine``; k is then
    unused), switching step kinds by ``policy`` and accepting by ``rule``."""

    draft_params: Params
    k: int = 3
    frspec_ids: Any = None
    form: str = "mtp"
    tree: Any = None
    policy: str = "measured"
    rule: str = "coupled"

    @property
    def lookahead(self) -> int:
        """Cache positions past the newest token one step may write."""
        if self.tree is None:
            return self.k
        return check_tree_shape(self.tree).lookahead

    @property
    def engine_key(self) -> tuple[Any, ...]:
        """The settings an engine compiles for (all but the draft and FR-Spec ids, which
        ``set_draft`` swaps), hashable, in this class's field order after ``draft_params``."""
        return (self.k, None, self.form, None if self.tree is None else tuple(self.tree),
                self.policy, self.rule)


def make_engine(cfg: ModelConfig, speculative: Speculative | None = None, **kw: Any
                ) -> DecodeEngine:
    """The engine ``generate``, the server and the benchmarks decode with: plain without
    ``speculative``, else a :class:`SpeculativeEngine` (chain) or, with ``speculative.tree``, a
    ``TreeEngine``, with its draft, FR-Spec ids and form (a draft of None is set later with
    ``set_draft``). ``kw``: :class:`DecodeEngine`'s."""
    if speculative is None:
        return DecodeEngine(cfg, **kw)
    common = dict(frspec_ids=speculative.frspec_ids, draft_form=speculative.form, **kw)
    if speculative.tree is not None:
        from cpmjax.serve.tree_engine import TreeEngine  # it builds on this module
        return TreeEngine(cfg, speculative.draft_params, tree=speculative.tree,
                          policy=speculative.policy, rule=speculative.rule, **common)
    return SpeculativeEngine(cfg, speculative.draft_params, k=speculative.k, **common)
