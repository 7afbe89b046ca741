"""Sampling math against hand-computed expectations (HF logits-processor semantics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.serve.sampling import (SamplingParams, apply_repetition_penalty, sample, top_k_mask,
                                   top_p_mask, token_logprobs)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = jnp.array([[2.0, -2.0, 3.0, -1.0]])
    seen = jnp.array([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, jnp.array([2.0]))
    np.testing.assert_array_equal(out, [[1.0, -4.0, 3.0, -1.0]])


def test_top_k_keeps_k_largest_per_row_and_zero_disables():
    logits = jnp.array([[0.1, 0.5, 0.3, 0.9], [4.0, 3.0, 2.0, 1.0]])
    out = top_k_mask(logits, jnp.array([2, 0]))
    assert np.isinf(out[0]).tolist() == [True, False, True, False]
    np.testing.assert_array_equal(out[1], logits[1])


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.array([probs, probs[::-1]]))
    out = top_p_mask(logits, jnp.array([0.75, 0.1]))
    # row 0: 0.5 < 0.75 so the 0.3 token is needed; the cumulative 0.8 >= 0.75 stops there.
    assert np.isfinite(out[0]).tolist() == [True, True, False, False]
    # row 1: the top token alone (0.5 >= 0.1) is kept, wherever it sits.
    assert np.isfinite(out[1]).tolist() == [False, False, False, True]


def _draw(logits, seen, step, **kw):
    B = logits.shape[0]
    full = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0}
    full.update(kw)
    args = {k: jnp.full((B,), v, jnp.int32 if k in ("top_k", "seed") else jnp.float32)
            for k, v in full.items()}
    return np.asarray(jax.jit(sample)(logits, seen, jnp.full((B,), step, jnp.int32), **args))


def test_greedy_at_zero_temperature_uses_penalised_logits():
    logits = jnp.array([[3.0, 2.0, 1.0]])
    seen = jnp.array([[True, False, False]])
    assert _draw(logits, seen, 0, temperature=0.0).tolist() == [0]
    assert _draw(logits, seen, 0, temperature=0.0, repetition_penalty=2.0).tolist() == [1]


def test_sampling_frequencies_follow_top_k_renormalised_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    B = 4000
    logits = jnp.tile(jnp.log(jnp.asarray(probs))[None], (B, 1))
    seen = jnp.zeros((B, 4), bool)
    args = dict(temperature=jnp.ones(B), top_k=jnp.full(B, 2, jnp.int32), top_p=jnp.ones(B),
                repetition_penalty=jnp.ones(B), seed=jnp.arange(B, dtype=jnp.int32))
    draws = np.asarray(sample(logits, seen, jnp.zeros(B, jnp.int32), **args))
    freq = np.bincount(draws, minlength=4) / B
    assert freq[2] == freq[3] == 0
    assert abs(freq[0] - 4 / 7) < 0.03  # 3-sigma for B=4000 is ~0.023


def test_same_seed_and_step_same_token_other_seed_differs():
    logits = jax.random.normal(jax.random.PRNGKey(1), (1, 1000))
    seen = jnp.zeros((1, 1000), bool)
    a = [_draw(logits, seen, s, seed=5)[0] for s in range(8)]
    assert a == [_draw(logits, seen, s, seed=5)[0] for s in range(8)]
    assert a != [_draw(logits, seen, s, seed=6)[0] for s in range(8)]


@pytest.mark.parametrize("kw, match", [({"temperature": -1}, "temperature"),
                                       ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
                                       ({"repetition_penalty": 0}, "repetition_penalty"),
                                       ({"seed": -1}, "seed"),
                                       # issue 11: values the engine could not hold or that
                                       # broke the logits (np.int32(2**31) overflowed in the
                                       # engine thread; 1e-300 is 0.0 in float32)
                                       ({"top_k": 2**31}, "top_k"), ({"seed": 2**31}, "seed"),
                                       ({"top_k": True}, "top_k must be an integer"),
                                       ({"top_k": 2.0}, "top_k must be an integer"),
                                       ({"temperature": float("nan")}, "temperature"),
                                       ({"temperature": float("inf")}, "temperature"),
                                       ({"top_p": float("nan")}, "top_p"),
                                       ({"temperature": True}, "temperature must be a number"),
                                       ({"repetition_penalty": 1e-300}, "repetition_penalty"),
                                       ({"repetition_penalty": 1e3}, "repetition_penalty")])
def test_invalid_parameters_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_argmax_last_equals_argmax_including_ties():
    from cpmjax.serve.sampling import argmax_last

    x = jax.random.normal(jax.random.key(0), (3, 5, 97))
    assert (argmax_last(x) == jnp.argmax(x, -1)).all()
    tied = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert argmax_last(tied).tolist() == [1, 0]  # the first maximum, as jnp.argmax


def test_token_logprobs_caps_alternatives_at_the_vocabulary_size():
    """A vocabulary smaller than the requested alternatives (tiny test models) yields all V."""
    logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    chosen, ids, vals = token_logprobs(logits, jnp.array([1, 2]), 20)
    assert ids.shape == vals.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(ids[:, 0]), [1, 0])
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(np.asarray(chosen), [lp[0, 1], lp[1, 2]], rtol=1e-6)
