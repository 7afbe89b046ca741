"""Token-id validation: the one check every boundary (Python API, engine, HTTP, files) applies.

Ids must be real integers (a ``bool`` is refused, as is a float that happens to be whole), lie in
``[0, vocab_size)`` and form a non-empty 1-D sequence or ``[batch, length]`` array. Errors name
what was checked (``name``), the rule and the first offending value.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TokenError(ValueError):
    """Token ids break a rule; the message names them and the rule."""


def check_token_ids(ids: Any, vocab_size: int, name: str = "token ids", *, ndim: int | None = None
                    ) -> np.ndarray:
    """``ids`` as an int32 array after checking them.

    ``ndim`` (1 or 2) demands that rank; None accepts either. Every row must be non-empty.
    """
    if isinstance(ids, np.ndarray):
        arr = ids
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TokenError(f"{name} must be integers, got dtype {arr.dtype}")
    else:
        _check_python_ints(ids, name)
        try:
            arr = np.asarray(ids, dtype=np.int64)
        except OverflowError:
            raise TokenError(f"{name}: a token id is outside the vocabulary [0, {vocab_size}) "
                             "(it does not even fit int64)") from None
        except ValueError as e:
            raise TokenError(f"{name} must be a list of integer token ids or of equally long "
                             f"lists of them ({e})") from None
    if ndim is not None and arr.ndim != ndim:
        raise TokenError(f"{name} must have {ndim} dimension(s), got shape {list(arr.shape)}")
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0 or arr.size == 0:
        raise TokenError(f"{name} must be a [length] or [batch, length] array with at least one "
                         f"token per row, got shape {list(arr.shape)}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise TokenError(f"{name}: token id {int(arr[bad][0])} is outside the vocabulary "
                         f"[0, {vocab_size})")
    return arr.astype(np.int32)


def _check_python_ints(ids: Any, name: str) -> None:
    """Refuse bools, floats and strings anywhere in a (nested) Python sequence."""
    stack = [ids]
    while stack:
        x = stack.pop()
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TokenError(f"{name} must be integers, got {type(x).__name__} {x!r}")
