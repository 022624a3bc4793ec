"""Build the device mesh from config."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from t2x.config import ConfigError, MeshConfig

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


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all global devices) with axes data, fsdp, tensor.

    The axes use classic automatic (GSPMD) sharding: jit in/out shardings and logical
    constraints decide the layout.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        # Topologies mesh_utils has no layout for: fall back to the plain device order.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
