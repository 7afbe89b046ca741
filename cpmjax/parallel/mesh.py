"""Device meshes over the axes (data, fsdp, tensor) from per-axis sizes with one -1 fill."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from cpmjax.parallel.rules import MESH_AXES


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = -1, tensor: int = 1) -> tuple[int, ...]:
    """Resolve the one -1 so the product equals the device count; errors name the axis."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fills = [k for k, v in sizes.items() if v == -1]
    if len(fills) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fills}")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ValueError(f"mesh axis {k!r} must be a positive integer or -1, got {v!r}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fills:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices are not divisible by the fixed mesh axes "
                             f"{ {k: v for k, v in sizes.items() if v != -1} }")
        sizes[fills[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                         f"have {num_devices}")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A GSPMD-style (Auto axis types) mesh; tensor is the fastest-varying axis."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), data, fsdp, tensor)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
