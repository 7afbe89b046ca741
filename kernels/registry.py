"""Implementation registries for kernel ops (the tokamax pattern: name -> callable, with a default
per platform).

Each op folder under ``kernels/`` keeps one :class:`Registry`. Callers ask for an implementation
by name (``"auto"`` picks the platform's default), so adding a backend touches only the op's
folder: the model and the configs pass names through. Backends whose import needs platform bits
(Pallas Mosaic GPU, Triton) register a *loader* that is only called when the backend is chosen.

``"auto"`` resolves against :func:`current_platform`: the platform of the context mesh's devices
(``jax.set_mesh``) when there is one, so a step compiled ahead of time for a TPU topology on a
CPU host picks the TPU kernels, else ``jax.default_backend()``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax


def current_platform() -> str:
    """Platform the code being traced will run on: the context mesh's, else the default one."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    if not mesh.empty and device is not None:
        return device.platform
    return jax.default_backend()


class Registry:
    """Named implementations of one op and the default name on each platform."""

    def __init__(self, op: str, defaults: Mapping[str, str], fallback: str) -> None:
        self.op = op
        self._defaults = dict(defaults)
        self._fallback = fallback
        self._loaders: dict[str, Callable[[], Callable[..., Any]]] = {}
        self._loaded: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, loader: Callable[[], Callable[..., Any]]) -> None:
        """Add ``name``; ``loader()`` returns the implementation (called on first use)."""
        if name == "auto" or name in self._loaders:
            raise ValueError(f"{self.op}: implementation name {name!r} is reserved or taken")
        self._loaders[name] = loader

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._loaders)

    def resolve(self, name: str = "auto", platform: str | None = None) -> str:
        """The concrete name ``name`` stands for (``"auto"``: the platform default)."""
        if name == "auto":
            platform = platform or current_platform()
            name = self._defaults.get(platform, self._fallback)
        if name not in self._loaders:
            raise ValueError(f"{self.op}: unknown implementation {name!r}; known: "
                             f"{['auto', *self._loaders]}")
        return name

    def get(self, name: str = "auto", platform: str | None = None) -> Callable[..., Any]:
        """The implementation called ``name`` (``"auto"``: the platform default)."""
        name = self.resolve(name, platform)
        if name not in self._loaded:
            self._loaded[name] = self._loaders[name]()
        return self._loaded[name]
