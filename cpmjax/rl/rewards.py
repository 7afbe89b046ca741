"""Verifiable rewards: the instruction set's judge (``cpmjax.posttrain.tasks``: exact match,
integer equality, numeric tolerance, a format check on the whole answer) and DAPO's soft
overlong penalty, as plain functions.

MiniCPM4's RL rewards (arXiv 2506.07900 §3.2) give 0 to an answer in the wrong format and
otherwise check it by rule; :func:`verifiable_reward` does that, with an optional partial credit
for a well-formed wrong answer (0 by default, as the report).
"""

from __future__ import annotations

from cpmjax.posttrain import tasks


def verifiable_reward(example: tasks.Example, text: str, format_credit: float = 0.0) -> float:
    """1 for a correct, well-formed answer; ``format_credit`` for a well-formed wrong one;
    0 for anything else (text as generated: thinking and end tokens are ignored by the judge)."""
    if tasks.check(example, text):
        return 1.0
    return format_credit if format_credit and tasks.well_formed(example, text) else 0.0


def soft_overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's length-aware penalty (arXiv 2503.14476 §3.4, eq. 13), added to the reward: 0 up to
    ``max_length - buffer`` tokens, then falling linearly to -1 at ``max_length``, -1 beyond."""
    if buffer < 1 or buffer > max_length:
        raise ValueError(f"overlong buffer must be in [1, max_length={max_length}], got {buffer}")
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / buffer
    return -1.0
