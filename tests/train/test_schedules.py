"""WSD / cosine shapes and that a resumed optimizer continues the same LR curve."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpmjax.train import schedules


@pytest.mark.parametrize("shape", ["exponential", "linear", "cosine", "1-sqrt"])
def test_wsd_phases(shape: str) -> None:
    s = schedules.wsd(1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2,
                      decay_shape=shape, final_ratio=0.1)
    lr = np.array([float(s(i)) for i in range(101)])
    np.testing.assert_allclose(lr[:10], (np.arange(10) + 1) / 10, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(lr[10:81], 1.0)  # stable up to the decay start (step 80)
    assert np.all(np.diff(lr[80:]) < 0)  # strictly decreasing in the decay phase
    assert lr[100] == pytest.approx(0.1, rel=1e-6)
    mid = {"exponential": 0.1 ** 0.5, "linear": 0.55, "cosine": 0.55,
           "1-sqrt": 1 - 0.9 * 0.5 ** 0.5}[shape]
    assert lr[90] == pytest.approx(mid, rel=1e-5)


def test_cosine_shape() -> None:
    s = schedules.cosine(2.0, total_steps=110, warmup_steps=10, final_ratio=0.1)
    assert float(s(4)) == pytest.approx(1.0)
    assert float(s(10)) == pytest.approx(2.0)
    assert float(s(60)) == pytest.approx(2.0 * 0.55, rel=1e-6)
    assert float(s(110)) == pytest.approx(0.2, rel=1e-6)
    assert float(s(500)) == pytest.approx(0.2, rel=1e-6)  # clamps past the end


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="decay_fraction"):
        schedules.wsd(1.0, 100, 10, decay_fraction=1.5)
    with pytest.raises(ValueError, match="final_ratio"):
        schedules.wsd(1.0, 100, 10, final_ratio=0.0)


def test_resume_mid_decay_continues_curve() -> None:
    """An optimizer rebuilt from a saved state mid-decay applies exactly the uninterrupted LRs."""
    s = schedules.wsd(0.5, total_steps=20, warmup_steps=2, decay_fraction=0.5,
                      decay_shape="exponential")
    make = lambda: optax.chain(optax.scale_by_schedule(lambda i: -s(i)))
    grads = {"w": jnp.ones(())}

    def run(tx, state, n):
        out = []
        for _ in range(n):
            u, state = tx.update(grads, state)
            out.append(float(u["w"]))
        return out, state

    full, _ = run(make(), make().init(grads), 20)
    first, saved = run(make(), make().init(grads), 13)  # stop mid-decay (decay starts at 10)
    saved = jax.tree.map(np.asarray, saved)  # as if written to and read from disk
    rest, _ = run(make(), saved, 7)
    assert first + rest == full
    np.testing.assert_allclose(-np.array(full), [float(s(i)) for i in range(20)], rtol=1e-6)
