"""Device mesh and logical-axis sharding."""

from t2x.parallel.mesh import MESH_AXES, make_mesh, resolve_axis_sizes
from t2x.parallel.sharding import (
    LOGICAL_RULES,
    batch_sharding,
    host_to_global,
    logical_to_shardings,
    process_rows,
    replicated,
    sharding_context,
)

__all__ = [
    "MESH_AXES",
    "LOGICAL_RULES",
    "batch_sharding",
    "host_to_global",
    "logical_to_shardings",
    "make_mesh",
    "process_rows",
    "replicated",
    "resolve_axis_sizes",
    "sharding_context",
]
