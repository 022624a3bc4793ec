"""Multi-process jobs with real processes on 127.0.0.1: equivalence (with an interleaved
device order), SLURM, preemption, lost processes, and jobs that cannot start."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, TEST_XLA_FLAGS, TINY, restored, tiny_config
from t2x.checkpoint import Checkpointer
from t2x.config import ConfigError, DistributedConfig, load_config
from t2x.parallel.distributed import initialize
from t2x.parallel.mesh import split_across_granules
from t2x.train.loop import train

TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")
LOCAL = str(REPO / "launch" / "local.sh")
INTERLEAVED = str(REPO / "tests" / "interleaved_mesh.py")
MESH = ["mesh.data=2", "mesh.fsdp=4"]  # data across the two processes, fsdp inside each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, **extra) -> dict:
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"
    return env


def local_job(run_dir, *overrides, t2x=None, **popen):
    """launch/local.sh 2 tiny.yaml ..., each process with 4 CPU devices."""
    env = cpu_env(4, T2X=t2x or f"{sys.executable} -m t2x.cli", T2X_CPU_DEVICES="4")
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
    """The JSON lines of a job's standard output, which holds nothing else."""
    return [json.loads(line) for line in out.splitlines()]


def wait_for_steps(run_dir, count, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"the job did not reach step {count} in {timeout} s")


def test_two_processes_match_one_through_ctrl_c_and_checkpoints_move_between_process_counts(tmp_path):
    """Steps 1-2 in this process; then a two-process job whose mesh interleaves the
    processes' devices (each process holds every other row of the batch, as on a
    multi-host TPU slice) until Ctrl-C on one process checkpoints both; then a plain
    two-process job to the end. The losses and parameters are those of one process."""
    steps = ["train.steps=12", "optim.decay_steps=12", "checkpoint.every=1000"]
    reference = tmp_path / "reference"
    train(tiny_config(reference, *steps, *MESH))
    run = tmp_path / "run"
    train(tiny_config(run, "train.steps=2", "optim.decay_steps=12", "checkpoint.every=1000", *MESH))

    job = local_job(run, *steps, t2x=f"{sys.executable} {INTERLEAVED}")
    wait_for_steps(run, 4, job)
    workers = subprocess.run(["pgrep", "-f", f"train.run_dir={run} .*distributed.process_id=1"],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGINT)  # through JAX's preemption service, as SIGTERM
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    assert "process 0 of 2 joined the job" in err
    [stopped] = results(out)  # one result, from process 0
    assert stopped["preempted"]
    at = stopped["step"]
    assert 4 <= at < 12
    assert Checkpointer(run / "checkpoints", read_only=True).all_steps() == [2, at]

    resumed = local_job(run, *steps)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert [r["step"] for r in results(out)] == [12]
    ref, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [ref[s] for s in range(1, 13)], rtol=5e-5)
    # The checkpoint the two processes wrote restores here, in one process, on another
    # mesh. (The attention key bias has no gradient, only rounding noise: hence atol.)
    written_by_two, _ = restored(run, "mesh.data=8", "mesh.fsdp=1", *steps)
    expected, _ = restored(reference, *MESH, *steps)
    for a, b in zip(jax.tree.leaves(written_by_two.params), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _start(env, run_dir, *overrides):
    cmd = [sys.executable, "-m", "t2x.cli", "train", TINY_CONFIG, *TINY, *MESH, f"train.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_slurm_environment_is_detected_and_process_zero_alone_builds_the_tokenizer(tmp_path):
    port = str(free_port())
    caches = [tmp_path / f"cache{i}" for i in range(2)]
    from t2x.data import corpus

    for cache in caches:  # the built-in corpus, but no tokenizer
        shutil.copytree(corpus.corpus_dir(), cache / "corpus" / corpus.corpus_dir().name)
    procs = [
        _start(cpu_env(4, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                          SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=port,
                          T2X_CACHE_DIR=str(caches[i])),
               tmp_path / "run", "train.steps=2", "data.tokenizer=builtin:384")
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "process 0 of 2 joined the job" in outputs[0][1]
    assert [json.loads(line)["step"] for line in outputs[0][0].splitlines()] == [2] and outputs[1][0] == ""
    assert "Gloo" in outputs[0][1], "what the collectives library prints goes to standard error"
    assert Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).all_steps() == [2]
    # Process 1 never trained a tokenizer: it tokenized with the bytes process 0 sent it.
    assert list((caches[0] / "tokenizers").glob("*384*.model")) and not (caches[1] / "tokenizers").exists()


@pytest.mark.parametrize("victim,mesh", [(1, []), (0, ["mesh.data=2", "mesh.fsdp=4"])])
def test_a_killed_process_stops_the_others_promptly_naming_it(tmp_path, victim, mesh):
    port = free_port()
    explicit = [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                "distributed.heartbeat_timeout=30", "train.steps=100000", "checkpoint.every=100000", *mesh]
    procs = [_start(cpu_env(4), tmp_path, *explicit, f"distributed.process_id={i}") for i in range(2)]
    survivor = procs[1 - victim]
    try:
        wait_for_steps(tmp_path, 3, procs[0])
        procs[victim].kill()
        killed_at = time.time()
        _, err = survivor.communicate(timeout=60)
        assert survivor.returncode == 1, err[-3000:]  # an error exit, not an abort
        assert time.time() - killed_at < 10, "well before the heartbeat timeout"
        assert f"process {1 - victim} lost contact with process {victim} of the job" in err
        assert "Check failure stack trace" not in err
    finally:
        for p in procs:
            p.kill()


def _cli(env, *overrides, timeout=60):
    cmd = [sys.executable, "-m", "t2x.cli", "train", TINY_CONFIG, *TINY, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_jobs_that_cannot_start_say_why(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _cli(cpu_env(4), f"train.run_dir={tmp_path}/a", f"distributed.coordinator_address=127.0.0.1:{port}",
                    "distributed.num_processes=2", "distributed.process_id=0")
    assert busy.returncode == 1 and f"coordinator port {port} is already in use" in busy.stderr
    started = time.time()
    unreachable = _cli(cpu_env(4), f"train.run_dir={tmp_path}/b",
                       f"distributed.coordinator_address=127.0.0.1:{free_port()}", "distributed.num_processes=2",
                       "distributed.process_id=1", "distributed.initialization_timeout=3")
    assert unreachable.returncode == 1 and "cannot reach the coordinator" in unreachable.stderr
    assert time.time() - started < 30
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "two", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    broken = _cli(cpu_env(4, **slurm), f"train.run_dir={tmp_path}/c")  # a detected job that cannot be joined
    assert broken.returncode == 1 and "SLURM" in broken.stderr and "Traceback" not in broken.stderr
    for result in (busy, unreachable, broken):
        assert result.stdout == ""
    assert not any((tmp_path / name / "checkpoints").exists() for name in "abc")


def test_hosts_take_the_data_axis_first():
    assert split_across_granules((4, 2, 1), 2) == (2, 1, 1)
    assert split_across_granules((1, 8, 1), 4) == (1, 4, 1)
    assert split_across_granules((2, 4, 2), 4) == (2, 2, 1)
    with pytest.raises(ConfigError, match="mesh.data"):
        split_across_granules((3, 1, 1), 2)


def test_single_process_stays_single():
    assert initialize(DistributedConfig(mode="off")) is False
    assert initialize(DistributedConfig()) is False  # nothing configured or detected
    with pytest.raises(ConfigError, match="distributed.mode=on, but no multi-process job"):
        initialize(DistributedConfig(mode="on"))
    assert jax.process_count() == 1
    with pytest.raises(ConfigError, match="distributed.process_id"):
        load_config(TINY_CONFIG, ["distributed.num_processes=2", "distributed.process_id=2"])


def test_local_launcher_rejects_bad_arguments():
    for args in ([], ["two", TINY_CONFIG], ["2", "missing.yaml"]):
        result = subprocess.run([LOCAL, *args], capture_output=True, text=True)
        assert result.returncode == 2 and "usage: launch/local.sh" in result.stderr


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_two_processes_train_the_other_families_as_one_does(tmp_path, family):
    from test_encoder import BERT_TINY, ENCODER, encoder_config
    from test_seq2seq import SEQ2SEQ, T5_TINY, seq2seq_config

    config, settings, make = {"encoder": (BERT_TINY, ENCODER, encoder_config),
                              "encoder_decoder": (T5_TINY, SEQ2SEQ, seq2seq_config)}[family]
    steps = ["train.steps=3", "checkpoint.every=1000"]
    train(make(tmp_path / "one", *steps, *MESH))
    env = cpu_env(4, T2X=f"{sys.executable} -m t2x.cli", T2X_CPU_DEVICES="4")
    job = subprocess.run([LOCAL, "2", str(config), *settings, *MESH, f"train.run_dir={tmp_path / 'two'}", *steps],
                         env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    [result] = results(job.stdout)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=5e-5)
    assert result["tokens"] > 0 and 0 <= result["accuracy"] <= 1
