"""Orbax checkpoints: restore onto another mesh, atomic saves, retention, checksums and damage."""

import gc
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import restored, tiny_config
from t2x.checkpoint import (
    CheckpointError,
    Checkpointer,
    DamagedCheckpointError,
    _quiet_closed_loop_noise,
    array_checksums,
    steps_to_delete,
)
from t2x.train.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4, and its final losses."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(run, "mesh.data=8", "train.steps=4", "checkpoint.every=2"))
    return run


def copy_of(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_checkpoint_restores_onto_a_different_mesh(trained):
    original, data = restored(trained, "mesh.data=8")
    resharded, _ = restored(trained, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    single, _ = restored(trained, "mesh.data=1", devices=jax.devices()[:1])
    kernel = resharded.params["blocks"]["layers"]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8
    for state in (resharded, single):
        assert int(state.step) == 4
        for a, b in zip(jax.tree.leaves((original.params, original.opt_state)),
                        jax.tree.leaves((state.params, state.opt_state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(data["shards"]) == 2 and data["data.num_shards"] == 2


def test_checksums_catch_any_flipped_bit_and_do_not_depend_on_the_mesh():
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(16, 8)).astype(np.float32), "n": np.arange(5, dtype=np.int32),
            "b": np.array([True, False])}
    base = array_checksums(jax.tree.map(jnp.asarray, tree))
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(tree["w"], jax.sharding.NamedSharding(mesh, P("x")))
    assert array_checksums({"w": sharded})["w"] == base["w"]
    for index in [(0, 0), (7, 3), (15, 7)]:
        for bit in (0, 13, 31):
            flipped = tree["w"].copy()
            flipped.view(np.uint32)[index] ^= np.uint32(1 << bit)
            assert array_checksums({"w": jnp.asarray(flipped)})["w"] != base["w"]
    swapped = tree["n"][::-1].copy()  # same values, other places
    assert array_checksums({"n": jnp.asarray(swapped)})["n"] != base["n"]


def largest_array_file(step_dir, item="params"):
    files = [f for f in glob.glob(f"{step_dir}/{item}/**/d/*", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def flip_bit(step_dir):
    path = largest_array_file(step_dir)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(path, "wb").write(bytes(data))


def edit_position(path):
    data = json.load(open(path))
    data["shards"][0] = [0, 9, 9]
    open(path, "w").write(json.dumps(data))


DAMAGE = {
    # the flipped byte lies in an array's bytes (its checksum catches it) or in zstd's
    # framing (the reader does), by how the data file happened to be laid out
    "flipped bit": (flip_bit, "params", "(checksum|Data corruption detected)"),
    "truncated file": (lambda d: os.truncate(largest_array_file(d, "opt_state"), 100), "opt_state", ""),
    "deleted file": (lambda d: os.remove(largest_array_file(d)), "params", ""),
    "deleted data metadata": (lambda d: os.remove(f"{d}/data/metadata"), "data", "not found"),
    "deleted item": (lambda d: shutil.rmtree(f"{d}/params"), "params", "missing"),
    "edited position": (lambda d: edit_position(f"{d}/data/metadata"), "data", "checksum"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_kind_of_damage_is_reported_naming_step_and_item(damage, trained, tmp_path, monkeypatch):
    run = copy_of(trained, tmp_path)
    mutate, item, says = DAMAGE[damage]
    mutate(run / "checkpoints" / "4")
    # Reads an earlier case's damage left unfinished end on Orbax's threads whenever they
    # end; held here, they cannot reach this case's hook (a process keeps t2x's filter).
    earlier = [o for o in gc.get_objects() if type(o) is types.CoroutineType]
    _quiet_closed_loop_noise()  # as a process that met damage has it: under this case's hook, and after it
    unraisable = []  # what would reach stderr as "Exception ignored in ..."
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(DamagedCheckpointError, match=f"checkpoint 4 in .* is damaged: {item}: .*{says}") as info:
        restored(run, "mesh.data=8")
    assert (info.value.step, info.value.item) == (4, item)
    gc.collect()
    assert not unraisable, "the damage is reported once, as the error: " + "; ".join(
        str(u.exc_value)[:100] for u in unraisable)
    del earlier
    restored(run, "mesh.data=8", step=2)  # the older one is intact


def test_a_checkpoint_of_another_model_is_told_apart_from_damage(trained):
    with pytest.raises(CheckpointError, match=r"params: .*shape \(2, 32, 64\), not \(2, 32, 96\).*model config") as info:
        restored(trained, "mesh.data=8", "model.d_ff=96")
    assert not isinstance(info.value, DamagedCheckpointError)


def test_training_falls_back_past_a_damaged_checkpoint_and_sets_it_aside(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    flip_bit(run / "checkpoints" / "4")
    with pytest.raises(CheckpointError, match="checkpoint 4 .* damaged: params.*on_damage=fallback"):
        train(tiny_config(run, "mesh.data=8", "train.steps=6", "checkpoint.every=2", "checkpoint.on_damage=stop"))
    assert Checkpointer(run / "checkpoints", read_only=True).all_steps() == [2, 4], "stop changes nothing"
    result = train(tiny_config(run, "mesh.data=8", "train.steps=6", "checkpoint.every=2", "checkpoint.keep=1"))
    assert result["step"] == 6
    # Steps 3-6 were trained again from step 2; retention kept the newest, the damaged one is aside.
    assert Checkpointer(run / "checkpoints", read_only=True).all_steps() == [6]
    assert [p.name.split("-")[0] for p in (run / "checkpoints" / "_damaged").iterdir()] == ["4"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "resume"] == [2]


def test_no_verifying_checkpoint_stops_without_moving_anything(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    for step in ("2", "4"):
        flip_bit(run / "checkpoints" / step)
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        train(tiny_config(run, "mesh.data=8", "train.steps=6", "checkpoint.every=2"))
    assert Checkpointer(run / "checkpoints", read_only=True).all_steps() == [2, 4]


def test_a_half_deleted_step_is_never_listed(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    step_dir = run / "checkpoints" / "4"
    os.remove(step_dir / "_CHECKPOINT_METADATA")  # what a non-atomic delete removes first
    shutil.rmtree(step_dir / "opt_state")
    assert Checkpointer(run / "checkpoints", read_only=True).all_steps() == [2]
    result = train(tiny_config(run, "mesh.data=8", "train.steps=4", "checkpoint.every=2"))
    assert result["step"] == 4 and Checkpointer(run / "checkpoints", read_only=True).all_steps() == [2, 4]
    restored(run, "mesh.data=8")  # the step written again is whole


KILLED_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, pathlib
    import jax.numpy as jnp
    from t2x.checkpoint import Checkpointer
    directory = pathlib.Path(sys.argv[1])
    ckpt = Checkpointer(directory)
    def arrays(step, size):
        return {"params": {"w": jnp.full((size,), float(step))}, "opt_state": {"count": jnp.int32(step)}}
    ckpt.save(1, arrays(1, 1000), {"data": {"shards": [[0, 1, 0]]}})
    ckpt.wait()
    ckpt.save(2, arrays(2, 64 * 1024 * 1024), {"data": {"shards": [[0, 2, 0]]}})  # 256 MB, in the background
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
    abstract = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    sharding = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    params = checkpointer.restore(1, {"params": abstract}, {"params": sharding})["params"]
    np.testing.assert_array_equal(params["w"], np.ones(1000))
    assert checkpointer.read_json(1, "data") == {"shards": [[0, 1, 0]]}
    checkpointer.close()
    assert sorted(os.listdir(directory)) == ["1"]


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys, pathlib
    import jax.numpy as jnp
    import numpy as np
    from t2x.checkpoint import Checkpointer, CheckpointError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    ckpt = Checkpointer(pathlib.Path(sys.argv[1]))
    ckpt.save(1, {"params": {"w": jnp.ones((1000,))}}, {"data": {}})
    ckpt.wait()
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files of 1 MB at most from here on
    try:
        noise = np.random.default_rng(0).normal(size=(1 << 21,)).astype(np.float32)  # 8 MB that do not compress
        ckpt.save(2, {"params": {"w": jnp.asarray(noise)}}, {"data": {}})
        ckpt.wait()
    except CheckpointError as e:
        print("ERROR:", e)
    """
)


def test_a_failed_save_is_reported_and_leaves_no_partial_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(directory)], capture_output=True, text=True)
    assert "ERROR: saving the checkpoint of step 2" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "step 1 is the newest complete checkpoint" in proc.stdout
    checkpointer = Checkpointer(directory)
    assert checkpointer.all_steps() == [1]
    checkpointer.close()
    assert sorted(os.listdir(directory)) == ["1"]


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    train(tiny_config(tmp_path, "train.steps=9", "checkpoint.every=1", "checkpoint.keep=2", "checkpoint.keep_every=4"))
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [4, 8, 9]


def test_the_newest_save_does_not_count_until_training_past_it_stays_finite():
    assert steps_to_delete([10, 20, 30, 40], keep=3, keep_every=None, unconfirmed=None) == [10]
    # 40 was just saved: 10, 20 and 30 stay until steps after 40 prove finite.
    assert steps_to_delete([10, 20, 30, 40], keep=3, keep_every=None, unconfirmed=40) == []
    assert steps_to_delete([10, 20, 30, 40, 50], keep=3, keep_every=None, unconfirmed=50) == [10]
    assert steps_to_delete([5, 10, 15, 20], keep=1, keep_every=10, unconfirmed=20) == [5]


def test_a_delete_cut_short_is_never_listed_and_is_finished_at_the_next_start(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    step_dir = run / "checkpoints" / "2"
    (step_dir / "_T2X_DELETING").write_text("")  # as a kill after the first deletions leaves it
    os.remove(step_dir / "_CHECKPOINT_METADATA")
    shutil.rmtree(step_dir / "params")
    assert Checkpointer(run / "checkpoints", read_only=True).all_steps() == [4]
    Checkpointer(run / "checkpoints").close()  # a writable open finishes the job
    assert sorted(os.listdir(run / "checkpoints")) == ["4"]
