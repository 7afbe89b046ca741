"""The ONE logical-axis rules table: logical axis name -> mesh axes.

Parameters, optimizer state, activations, batches and KV caches all carry logical axis names
(see ``cpmjax.model.params.param_specs``, ``cpmjax.model.cache.CACHE_AXES`` and the
``activation_*`` names used by ``cpmjax.model.transformer`` and ``cpmjax.model.attention``);
this table alone decides how they are laid out on a mesh of axes ``(data, fsdp, tensor)``.

Activations have names of their own because they split differently from the weights they meet:
the embedding dimension of a weight is split over ``fsdp`` (ZeRO-3 style: gathered per layer),
while an activation is split over the batch on ``data`` and ``fsdp`` and keeps its embedding
dimension whole. Heads and the MLP dimension go over ``tensor`` on both. There is no sequence
axis: README "Sharding and scale" says why MiniCPM4's shapes do not need one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    # the query heads sharing one KV head: split over tensor when the KV heads cannot be
    # (MiniCPM4 has 2 KV heads; tensor=4 splits each group of 16 query heads 4 ways instead)
    "activation_q_per_kv": "tensor",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
}


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh | None = None,
                    rules: Mapping[str, Any] = LOGICAL_AXIS_RULES,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names.

    A mesh axis is used at most once per array. With ``mesh`` and ``shape`` given, a dimension whose
    size is not divisible by the mesh axes' size is replicated instead (e.g. 2 KV heads on 4-way
    tensor parallelism), so small models still shard.
    """
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        target = rules[name]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used
                          and (mesh is None or mesh.shape.get(a, 1) > 1))
        if mesh is not None and shape is not None and mesh_axes:
            size = 1
            for a in mesh_axes:
                size *= mesh.shape[a]
            if shape[i] % size:
                mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def tree_shardings(axes_tree: Any, abstract_tree: Any, mesh: Mesh,
                   rules: Mapping[str, Any] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree given its logical-axes tree and matching shapes."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, mesh, rules, x.shape)),
        axes_tree, abstract_tree, is_leaf=lambda a: isinstance(a, tuple))
