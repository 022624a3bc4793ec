"""Orbax checkpoints: restore onto another mesh, atomic saves, retention."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from t2x.checkpoint import Checkpointer
from t2x.components import build
from t2x.config import CheckpointConfig
from t2x.parallel import sharding_context
from t2x.train.loop import train
from t2x.train.state import make_optimizer, state_shardings


def restore_on(cfg, run_dir, mesh_overrides, devices=None):
    cfg = tiny_config(run_dir, *mesh_overrides)
    c = build(cfg, devices=devices)
    tx, _ = make_optimizer(cfg)
    with sharding_context(c.mesh):
        abstract, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        checkpointer = Checkpointer(run_dir / "checkpoints", read_only=True)
        state, data = checkpointer.restore(None, abstract, shardings)
    return state, data


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    train(tiny_config(tmp_path, "mesh.data=8", "train.steps=2"))
    original, data = restore_on(None, tmp_path, ["mesh.data=8"])
    resharded, _ = restore_on(None, tmp_path, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    single, _ = restore_on(None, tmp_path, ["mesh.data=1"], devices=jax.devices()[:1])
    kernel = resharded.params["blocks"]["layers"]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8
    for restored in (resharded, single):
        assert int(restored.step) == 2
        for a, b in zip(jax.tree.leaves((original.params, original.opt_state)),
                        jax.tree.leaves((restored.params, restored.opt_state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(data["shards"]) == 8 and data["data.num_shards"] == 8


KILLED_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, time, pathlib
    import jax.numpy as jnp
    from t2x.checkpoint import Checkpointer
    from t2x.train.state import TrainState
    directory = pathlib.Path(sys.argv[1])
    ckpt = Checkpointer(directory)
    def state(step, size):
        return TrainState(step=jnp.int32(step), params={"w": jnp.full((size,), float(step))},
                          opt_state={"count": jnp.int32(step)})
    ckpt.save(state(1, 1000), {"shards": [[0, 1, 0]]}, {})
    ckpt.wait()
    ckpt.save(state(2, 64 * 1024 * 1024), {"shards": [[0, 2, 0]]}, {})  # 256 MB, written in the background
    partial = [p.name for p in directory.iterdir() if "tmp" in p.name]
    print("partial:", partial, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(tmp_path):
    directory = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, str(directory)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "partial: ['2." in proc.stdout, "the kill should land while step 2 is still being written"
    checkpointer = Checkpointer(directory)  # a writable manager also clears the leftover temporary folder
    assert checkpointer.all_steps() == [1]
    restored = checkpointer.manager.restore(1)
    np.testing.assert_array_equal(restored["params"]["w"], np.ones(1000))
    assert restored["data"]["shards"] == [[0, 1, 0]]
    checkpointer.close()
    assert sorted(os.listdir(directory)) == ["1"]


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=9", "checkpoint.every=1", "checkpoint.keep=2", "checkpoint.keep_every=4")
    train(cfg)
    assert Checkpointer(tmp_path / "checkpoints", CheckpointConfig(), read_only=True).all_steps() == [4, 8, 9]
