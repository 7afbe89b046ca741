"""Activation sharding and manual partitioning of kernels, both from the one rules table.

Both read the mesh from the tracing context (``jax.set_mesh(mesh)`` around the jitted call,
as ``cpmjax.train.step.jit_train_step`` and ``launch/aot_compile.py`` do) and do nothing
without one, so the model runs unchanged on a single device and in tests.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.sharding import NamedSharding

from cpmjax.parallel.rules import logical_to_spec

Axes = Sequence[str | None]


def _context_mesh() -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """``with_sharding_constraint`` to the layout the rules give ``axes`` (a no-op without a
    context mesh, or when ``x`` is already inside a manual ``shard_map``)."""
    mesh = _context_mesh()
    if mesh is None or mesh.manual_axes:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(axes, mesh, shape=x.shape)))


def kernel_map(fn: Callable[..., Any], in_axes: Sequence[Axes | None],
               out_axes: Axes) -> Callable[..., Any]:
    """``fn`` run per shard under ``jax.shard_map`` with in/out specs from the rules table.

    For Pallas Mosaic kernels, which XLA cannot partition: each argument ``i`` is split as
    ``in_axes[i]`` says (``None`` for an argument that is ``None``), the output as ``out_axes``.
    A dimension the rules cannot split evenly stays whole (see ``logical_to_spec``), so the
    kernel must be correct on any such split: batch and head splits are, for attention.
    Without a context mesh, or inside a ``shard_map`` already (the arguments are per shard
    there), ``fn`` is returned unchanged. A one-device mesh still maps: Mosaic kernels compile
    only inside ``shard_map``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return fn

    def spec(a: Any, axes: Any) -> Any:
        if a is None:
            return None
        if isinstance(a, (tuple, list)):  # a tuple of arrays with a tuple of axes
            return tuple(spec(x, ax) for x, ax in zip(a, axes))
        return logical_to_spec(axes, mesh, shape=a.shape)

    def call(*args: Any) -> Any:
        specs = tuple(spec(a, axes) for a, axes in zip(args, in_axes))
        out_shape = jax.eval_shape(fn, *args)
        out_spec = logical_to_spec(out_axes, mesh, shape=out_shape.shape)
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec,
                             check_vma=False)(*args)

    return call


class InMesh:
    """A jitted function whose calls, ``lower`` and ``eval_shape`` run under ``jax.set_mesh``.

    ``jax.set_mesh`` cannot be entered inside a trace, so the context mesh has to be set around
    each call of the jitted function; this wrapper does it.
    """

    def __init__(self, jitted: Any, mesh: Any) -> None:
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)

    def eval_shape(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.eval_shape(*args, **kwargs)
