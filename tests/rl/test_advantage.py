"""Group-normalised advantages and the dynamic-sampling rule."""

from __future__ import annotations

import numpy as np
import pytest

from cpmjax.rl.advantage import group_advantages, informative


def test_group_advantages():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert np.allclose(adv, [1, -1, -1, 1], atol=1e-5)
    assert np.allclose(group_advantages([3.0, 1.0], std_normalize=False), [1.0, -1.0])
    assert np.allclose(group_advantages([0.5, 0.5, 0.5]), 0.0)  # all equal: no signal, no NaN
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages([1.0])


def test_informative():
    assert informative([0.0, 1.0, 0.0])
    assert not informative([1.0, 1.0, 1.0]) and not informative([0.0, 0.0])
