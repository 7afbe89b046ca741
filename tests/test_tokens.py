"""The one token-id check: strict integers, in the vocabulary, non-empty rows, named errors."""

import numpy as np
import pytest

from cpmjax.tokens import TokenError, check_token_ids


def test_valid_ids_come_back_as_int32():
    assert check_token_ids([1, 2, 3], 10).dtype == np.int32
    assert check_token_ids(np.array([[1, 2], [3, 4]], np.int64), 10).shape == (2, 2)


@pytest.mark.parametrize("ids, match", [
    ([], "at least one token"), ([[]], "at least one token"), ([1, True], "must be integers"),
    ([1.0], "must be integers"), (["a"], "must be integers"), ([1, 10], "token id 10 is outside"),
    ([-1], "token id -1 is outside"), ([[1, 2], [3]], "equally long"),
    (np.array([1.5]), "dtype float64"), ([2**70], "outside"),
])
def test_bad_ids_are_refused_by_name(ids, match):
    with pytest.raises(TokenError, match=match) as e:
        check_token_ids(ids, 10, "prompt")
    assert str(e.value).startswith("prompt")


def test_rank_can_be_required():
    with pytest.raises(TokenError, match="must have 1 dimension"):
        check_token_ids([[1]], 10, ndim=1)
