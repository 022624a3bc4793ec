"""Logical-axis rules: the one table that maps model axis names onto the mesh.

Parameters and activations are annotated with logical names (``embed``, ``heads``,
``batch`` ...). Changing the mesh sizes in config changes the parallelism (data, FSDP,
tensor or mixed) with no change to model code.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

# logical axis -> mesh axes. Activations first, then parameters.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters (optimizer state follows its parameter)
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),  # the output side of a [d_model, d_model] matrix (BERT's MLM transform)
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("position", None),
    ("relative_buckets", None),  # rows of T5's relative position bias table ([buckets, heads])
    ("norm", None),
    ("layers", None),
)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=LOGICAL_RULES):
    """Mesh and logical rules active while tracing model code, so constraints apply.

    Flax applies its logical constraints only where JAX reports an abstract mesh in
    context, which ``with mesh:`` alone no longer sets (every constraint would silently
    be dropped): the abstract mesh is set too. The concrete mesh is not set with
    ``jax.set_mesh``, which would also make every jitted computation in the context
    (checksums of single-device arrays, say) refuse arrays placed off the mesh."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*context manager has been deprecated", category=DeprecationWarning)
        # An enclosing context's mesh (a run sampling on one device at its end) is left
        # first: JAX will not swap one abstract mesh for another of a different size.
        with (mesh, jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())),
              jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules)):
            yield


def batch_shards(batch: int) -> int:
    """How many ways the active mesh (``sharding_context``) splits the ``batch`` logical
    axis: the product of its mesh axes' sizes; 1 outside a mesh, or where that does not
    divide ``batch``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    shards = _axis_size(mesh, nn.logical_to_mesh_axes(("batch",))[0])
    return shards if batch % shards == 0 else 1


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """Drop sharding on dimensions the mesh axes do not divide (they stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is not None and dim % _axis_size(mesh, axes):
            log.warning("%s: dimension %d is not divisible by mesh axes %s; replicating it", where, dim, axes)
            axes = None
        fitted.append(axes)
    return PartitionSpec(*fitted)


def logical_to_shardings(logical_specs: Any, abstract: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs.

    Args:
      logical_specs: tree of PartitionSpec over logical names (``nn.get_partition_spec``);
        a ``None`` leaf or empty spec means replicated.
      abstract: matching tree of arrays or ShapeDtypeStructs, used to check divisibility.
      mesh: the device mesh.
      rules: logical-to-mesh rule table.

    Returns:
      A tree of NamedSharding with the structure of ``abstract``.
    """
    paths_and_shapes = jax.tree_util.tree_flatten_with_path(abstract)[0]
    treedef = jax.tree.structure(abstract)
    specs = treedef.flatten_up_to(logical_specs)
    shardings = []
    for (path, leaf), spec in zip(paths_and_shapes, specs):
        mesh_spec = nn.logical_to_mesh_axes(spec, rules) if spec is not None else PartitionSpec()
        where = jax.tree_util.keystr(path)
        shardings.append(NamedSharding(mesh, _fit_spec(mesh_spec, tuple(leaf.shape), mesh, where)))
    return jax.tree.unflatten(treedef, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of input batches: leading (batch) dimension over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array every device holds whole."""
    return NamedSharding(mesh, PartitionSpec())


def process_rows(mesh: Mesh, global_batch_size: int) -> list[int]:
    """Rows of the global batch that this process's devices hold, ascending.

    They need not be contiguous: on a multi-host TPU slice the mesh follows the physical
    topology, and a process's devices can alternate with other processes' along the
    batch axes. ``host_to_global`` takes this process's rows in this order.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return sorted(rows)


def host_to_global(batch: dict[str, Any], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of a batch, in ``process_rows`` order
    (``jax.make_array_from_process_local_data`` places each device's rows)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
        for k, v in batch.items()
    }
