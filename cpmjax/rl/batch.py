"""Train batches from scored groups: one trajectory per row, padded to a power-of-two length.

Row layout (the model inputs of ``cpmjax.train.step`` plus the RL fields, all ``[rows, T]``):
``inputs``/``targets`` are the prompt+response tokens shifted by one, ``segment_ids`` 1 on real
tokens and 0 on padding, ``loss_mask`` 1 where the target is a response token (a truncated
response is left out of the loss under overlong filtering, DAPO arXiv 2503.14476 §3.4),
``old_logprobs`` the behaviour log-probability the engine recorded for that token,
``advantages`` the trajectory's group-normalised advantage, ``weights`` the aggregation weights
of :func:`cpmjax.rl.loss.token_weights` over the update's rows, ``staleness`` the policy versions
between the token's sampler and the policy being trained.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cpmjax.rl.advantage import group_advantages
from cpmjax.rl.buffer import Group
from cpmjax.rl.loss import token_weights
from cpmjax.serve.engine import pow2_bucket

Batch = dict[str, np.ndarray]
MIN_LENGTH = 64  # smallest padded row length (few distinct shapes, few compilations)


def group_rows(groups: Sequence[Group], version: int, filter_truncated: bool,
               std_normalize: bool = True, length: int | None = None) -> Batch:
    """One row per trajectory of ``groups`` (scored), without ``weights``; ``length`` (default:
    a power-of-two bucket of the longest row) fixes T. A trajectory with no token in the loss (a
    filtered truncated one: it counted only for its group's advantages) keeps an empty row, so
    one response cut at a long budget does not pad the whole batch to its length."""
    trajs = [(m, a) for g in groups
             for m, a in zip(g.members, group_advantages(g.rewards, std_normalize))]
    in_loss = [not (filter_truncated and m.finish == "length") for m, _ in trajs]
    longest = max([len(m.prompt) + len(m.response) - 1 for (m, _), k in zip(trajs, in_loss)
                   if k] or [1])
    T = pow2_bucket(longest, MIN_LENGTH) if length is None else length
    if longest > T:
        raise ValueError(f"a trajectory of {longest + 1} tokens does not fit rows of {T}")
    rows = len(trajs)
    out = {k: np.zeros((rows, T), np.int32) for k in ("inputs", "targets", "positions",
                                                       "segment_ids", "staleness")}
    out.update({k: np.zeros((rows, T), np.float32) for k in ("loss_mask", "old_logprobs",
                                                              "advantages")})
    for r, ((m, adv), keep) in enumerate(zip(trajs, in_loss)):
        if not keep:
            continue
        tokens = np.asarray(m.prompt + m.response, np.int32)
        n, p = len(tokens) - 1, len(m.prompt)
        out["inputs"][r, :n], out["targets"][r, :n] = tokens[:-1], tokens[1:]
        out["positions"][r, :n] = np.arange(n)
        out["segment_ids"][r, :n] = 1
        resp = slice(p - 1, n)  # targets that are response tokens
        out["loss_mask"][r, resp] = 1.0
        out["old_logprobs"][r, resp] = m.logprobs
        out["advantages"][r, resp] = adv
        out["staleness"][r, resp] = version - np.asarray(m.versions)
    return out


def split_updates(batch: Batch, minibatches: int, aggregation: str) -> list[Batch]:
    """The batch as ``minibatches`` equal slices of rows (one optimizer update each), each with
    its own aggregation weights."""
    rows = len(batch["inputs"])
    if rows % minibatches:
        raise ValueError(f"{rows} rows do not split into {minibatches} minibatches")
    size = rows // minibatches
    parts = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()}
             for i in range(minibatches)]
    for part in parts:
        part["weights"] = token_weights(part["loss_mask"], aggregation)
    return parts
