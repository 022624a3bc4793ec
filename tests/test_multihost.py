"""Multi-process jobs with real processes on 127.0.0.1: equivalence, SLURM, preemption, lost processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, TINY, tiny_config
from t2x.checkpoint import Checkpointer
from t2x.components import build
from t2x.config import ConfigError, DistributedConfig, load_config
from t2x.parallel import sharding_context
from t2x.parallel.distributed import initialize
from t2x.parallel.mesh import split_across_granules
from t2x.train.loop import train
from t2x.train.state import make_optimizer, state_shardings

TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")
LOCAL = str(REPO / "launch" / "local.sh")
MESH = ["mesh.data=2", "mesh.fsdp=4"]  # data across the two processes, fsdp inside each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, **extra) -> dict:
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def local_job(run_dir, *overrides, **popen):
    """launch/local.sh 2 tiny.yaml ..., each process with 4 CPU devices."""
    env = cpu_env(4, T2X=f"{sys.executable} -m t2x.cli", T2X_CPU_DEVICES="4")
    cmd = [LOCAL, "2", TINY_CONFIG, *TINY, *MESH, f"train.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, **popen)


def losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train" and "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def results(out: str) -> list[dict]:
    """The JSON lines the processes printed (local.sh tags other processes' lines)."""
    lines = [line.split("] ", 1)[-1] if line.startswith("[process") else line for line in out.splitlines()]
    return [json.loads(line) for line in lines if line.startswith("{")]


def wait_for_steps(run_dir, count, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"the job did not reach step {count} in {timeout} s")


def restore_params(run_dir, *overrides):
    cfg = tiny_config(run_dir, *overrides)
    c = build(cfg)
    tx, _ = make_optimizer(cfg)
    with sharding_context(c.mesh):
        abstract, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        state, _ = Checkpointer(run_dir / "checkpoints", read_only=True).restore(None, abstract, shardings)
    return jax.device_get(state.params)


def test_two_processes_match_one_and_checkpoints_move_between_process_counts(tmp_path):
    reference = tmp_path / "reference"
    train(tiny_config(reference, "train.steps=4", "checkpoint.every=2", *MESH))
    mixed = tmp_path / "mixed"  # steps 1-2 in this process, 3-4 in a two-process job
    train(tiny_config(mixed, "train.steps=2", "optim.decay_steps=4", "checkpoint.every=2", *MESH))
    job = local_job(mixed, "train.steps=4", "optim.decay_steps=4", "checkpoint.every=2")
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert "process 0 of 2 joined the job" in err
    ref, got = losses(reference), losses(mixed)
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)], rtol=2e-5)
    # The checkpoint the two processes wrote restores here, in one process, on another mesh.
    written_by_two = restore_params(mixed, "mesh.data=8", "mesh.fsdp=1")
    for a, b in zip(jax.tree.leaves(written_by_two), jax.tree.leaves(restore_params(reference, *MESH))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sigterm_to_one_process_checkpoints_both_and_resume_continues_the_curve(tmp_path):
    run = tmp_path / "run"
    steps = ["train.steps=60", "checkpoint.every=1000"]
    job = local_job(run, *steps)
    wait_for_steps(run, 4, job)
    workers = subprocess.run(["pgrep", "-f", f"train.run_dir={run} .*distributed.process_id=1"],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    stopped = results(out)
    assert len(stopped) == 2 and stopped[0] == stopped[1] and stopped[0]["preempted"]
    at = stopped[0]["step"]
    assert 4 <= at < 60
    assert Checkpointer(run / "checkpoints", read_only=True).all_steps() == [at]

    resumed = local_job(run, *steps)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert [r["step"] for r in results(out)] == [60, 60]
    reference = tmp_path / "reference"
    train(tiny_config(reference, *steps, *MESH))
    ref, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, 61))
    np.testing.assert_allclose([got[s] for s in range(1, 61)], [ref[s] for s in range(1, 61)], rtol=5e-5)


def _start(env, run_dir, *overrides):
    cmd = [sys.executable, "-m", "t2x.cli", "train", TINY_CONFIG, *TINY, *MESH, f"train.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_slurm_environment_is_detected(tmp_path):
    port = str(free_port())
    procs = [
        _start(cpu_env(4, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                          SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=port),
               tmp_path, "train.steps=2")
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert "process 0 of 2 joined the job" in results[0][1]
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [2]


def test_a_killed_process_stops_the_others_instead_of_hanging(tmp_path):
    port = free_port()
    explicit = [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                "distributed.heartbeat_timeout=10", "train.steps=100000", "checkpoint.every=100000"]
    procs = [_start(cpu_env(4), tmp_path, *explicit, f"distributed.process_id={i}") for i in range(2)]
    try:
        wait_for_steps(tmp_path, 3, procs[0])
        procs[1].kill()
        killed_at = time.time()
        procs[0].communicate(timeout=60)
        assert procs[0].returncode != 0
        assert time.time() - killed_at < 60
    finally:
        for p in procs:
            p.kill()


def test_hosts_take_the_data_axis_first():
    assert split_across_granules((4, 2, 1), 2) == (2, 1, 1)
    assert split_across_granules((1, 8, 1), 4) == (1, 4, 1)
    assert split_across_granules((2, 4, 2), 4) == (2, 2, 1)
    with pytest.raises(ConfigError, match="mesh.data"):
        split_across_granules((3, 1, 1), 2)


def test_single_process_stays_single():
    assert initialize(DistributedConfig(mode="off")) is False
    assert initialize(DistributedConfig()) is False  # nothing configured or detected
    assert jax.process_count() == 1
    with pytest.raises(ConfigError, match="distributed.process_id"):
        load_config(TINY_CONFIG, ["distributed.num_processes=2", "distributed.process_id=2"])


def test_local_launcher_rejects_bad_arguments():
    for args in ([], ["two", TINY_CONFIG], ["2", "missing.yaml"]):
        result = subprocess.run([LOCAL, *args], capture_output=True, text=True)
        assert result.returncode == 2 and "usage: launch/local.sh" in result.stderr
