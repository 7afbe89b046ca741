"""The implementation registry: platform defaults, lazy loaders, clear errors."""

import pytest

from kernels.registry import Registry


def test_auto_picks_the_platform_default_and_loads_once():
    calls = []

    def loader():
        calls.append(1)
        return lambda x: x + 1

    reg = Registry("op", defaults={"tpu": "fast"}, fallback="plain")
    reg.register("fast", loader)
    reg.register("plain", lambda: (lambda x: x))
    assert reg.resolve("auto", platform="tpu") == "fast"
    assert reg.resolve("auto", platform="cpu") == "plain"
    assert reg.get("auto", platform="tpu")(1) == 2
    assert reg.get("fast")(1) == 2 and len(calls) == 1
    assert reg.names == ("fast", "plain")


def test_unknown_and_duplicate_names_are_refused():
    reg = Registry("op", defaults={}, fallback="plain")
    reg.register("plain", lambda: (lambda: None))
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        reg.get("nope")
    with pytest.raises(ValueError, match="reserved or taken"):
        reg.register("plain", lambda: None)
    with pytest.raises(ValueError, match="reserved or taken"):
        reg.register("auto", lambda: None)
