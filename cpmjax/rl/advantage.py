"""Group-relative advantages (GRPO, arXiv 2402.03300 §4.1.2) and DAPO's dynamic-sampling filter
(arXiv 2503.14476 §3.2)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def group_advantages(rewards: Sequence[float], std_normalize: bool = True,
                     eps: float = 1e-6) -> np.ndarray:
    """``(r - mean) / (std + eps)`` over one group of G samples of a prompt (population std);
    ``std_normalize=False`` keeps ``r - mean`` (Dr. GRPO, arXiv 2503.20783, drops the std
    because it up-weights groups that are nearly all right or all wrong)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size < 2:
        raise ValueError(f"a group needs >= 2 rewards, got shape {r.shape}")
    adv = r - r.mean()
    return (adv / (r.std() + eps) if std_normalize else adv).astype(np.float32)


def informative(rewards: Sequence[float], tol: float = 1e-9) -> bool:
    """DAPO's dynamic-sampling rule: keep a group unless all its rewards are equal (all right or
    all wrong for 0/1 rewards), whose advantages would be zero and carry no gradient."""
    r = np.asarray(rewards, np.float64)
    return bool(r.max() - r.min() > tol)
