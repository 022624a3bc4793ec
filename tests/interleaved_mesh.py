"""The t2x command with a mesh whose device order interleaves the processes along the
batch axes, as ``create_device_mesh`` can lay out a multi-host TPU slice:
``python tests/interleaved_mesh.py train CONFIG ...``."""

import sys

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

import t2x.components
from t2x.cli import entry
from t2x.parallel.mesh import MESH_AXES, resolve_axis_sizes


def interleaved_mesh(config, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(config, len(devices))
    # [p0 d0, p1 d0, p0 d1, p1 d1, ...]: neighbours on every axis belong to different processes.
    order = sorted(devices, key=lambda d: (d.id - min(x.id for x in devices if x.process_index == d.process_index),
                                            d.process_index))
    grid = np.asarray(order, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


t2x.components.make_mesh = interleaved_mesh

if __name__ == "__main__":
    sys.exit(entry())
