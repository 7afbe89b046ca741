"""Mesh construction and the logical-axis rules table."""

from cpmjax.parallel.mesh import make_mesh, mesh_shape
from cpmjax.parallel.rules import LOGICAL_AXIS_RULES, MESH_AXES, logical_to_spec, tree_shardings

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "logical_to_spec", "make_mesh", "mesh_shape",
           "tree_shardings"]
