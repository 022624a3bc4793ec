"""Build the device mesh from config."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import AxisType, Mesh

from t2x.config import ConfigError, MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(config: MeshConfig, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with a -1 entry replaced by the devices left over.

    Raises:
      ConfigError: the sizes cannot multiply to ``num_devices``.
    """
    sizes = dict(config.axis_sizes)
    fixed = math.prod(s for s in sizes.values() if s != -1)
    shown = " x ".join(f"{k}={v}" for k, v in sizes.items())
    if -1 in sizes.values():
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {shown} cannot fill {num_devices} devices: {num_devices} is not divisible by {fixed}; "
                "change mesh.data, mesh.fsdp or mesh.tensor"
            )
        sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {shown} has {fixed} devices but {num_devices} are available; "
            "change mesh.data, mesh.fsdp or mesh.tensor (one of them may be -1 to take the rest)"
        )
    return sizes


def _granules(devices: Sequence[jax.Device]) -> tuple[int, bool]:
    """How many groups of devices talk over the data-center network, and whether they are
    TPU slices (else processes, as for GPU hosts and CPU processes)."""
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices}), True
    return len({d.process_index for d in devices}), False


def split_across_granules(shape: tuple[int, ...], granules: int) -> tuple[int, ...]:
    """The share of each mesh axis that spans granules (hosts or slices).

    The data axis crosses granules first, then fsdp, and tensor only as a last resort,
    so the chattiest axes stay on the fast links inside a host or slice.
    """
    across, left = [], granules
    for size in shape:
        share = math.gcd(size, left)
        across.append(share)
        left //= share
    if left != 1:
        raise ConfigError(
            f"a mesh of {dict(zip(MESH_AXES, shape))} cannot be split over {granules} hosts or slices; "
            "make mesh.data (or mesh.fsdp) a multiple of the number of hosts"
        )
    if across[MESH_AXES.index("tensor")] > 1:
        log.warning("mesh.tensor spans hosts; tensor parallelism across the network is slow")
    return tuple(across)


def keep_cpu_collectives_in_order() -> bool:
    """Turn JAX's persistent compilation cache off where XLA:CPU programs hold
    collectives: on the CPU backend with more than one device in the job. Returns
    whether this call turned it off.

    XLA:CPU runs one program's collectives in the program's order, held by a resource
    they all share; the form in which the cache keeps a program gives each collective a
    resource of its own, so a program read back from the cache may run independent
    collectives at once and in a different order on each device. Across processes (gloo)
    the ranks then meet in different collectives ("op.preamble.length <= op.nbytes"); in
    one process the devices waiting in collectives can hold every thread of XLA's pool
    while a device that has not reached them gets none, and XLA aborts the process after
    40 s ("Termination timeout for `all gather ...`"). Programs compiled afresh keep the
    order, but for what follows a loop holding collectives (``unordered_collectives``,
    which is why a CPU leaves no loop of layers: ``scan_unroll``); GPU and TPU runtimes
    order collectives on their own.
    """
    if not jax.config.jax_enable_compilation_cache or jax.default_backend() != "cpu" or jax.device_count() < 2:
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # it takes effect from the next compile on
    if jax.config.jax_compilation_cache_dir:
        log.info("JAX's persistent compilation cache is off: XLA:CPU programs read back from it can run the "
                 "collectives of %d devices out of order", jax.device_count())
    return True


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all global devices) with axes data, fsdp, tensor.

    Across several hosts (GPU, CPU) or TPU slices the mesh is hybrid: each axis is split
    into a part inside a host or slice and a part across them (``split_across_granules``).
    The axes use classic automatic (GSPMD) sharding: jit in/out shardings and logical
    constraints decide the layout. On CPU with several devices, JAX's persistent compilation
    cache is turned off first (``keep_cpu_collectives_in_order``).
    """
    keep_cpu_collectives_in_order()
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    granules, are_slices = _granules(devices)
    if granules > 1:
        across = split_across_granules(shape, granules)
        inside = tuple(s // a for s, a in zip(shape, across))
        device_array = mesh_utils.create_hybrid_device_mesh(
            inside, across, devices, process_is_granule=not are_slices
        )
    else:
        try:
            device_array = mesh_utils.create_device_mesh(shape, devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Topologies mesh_utils has no layout for: fall back to the plain device order.
            device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
