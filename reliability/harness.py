"""What the fault scenarios share: launching ``t2x`` as a real process, watching its run
directory, and checking that nothing was lost (losses and final state bitwise)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "tiny.yaml")
# The quickstart model (1.3M parameters, so a checkpoint takes long enough to be hit),
# with short rows, frequent checkpoints and every step logged.
BASE = [
    "data.seq_len=64", "train.global_batch_size=8", "train.log_every=1", "train.progress_bar=false",
    "optim.warmup_steps=4", "optim.decay_steps=40", "checkpoint.every=4", "checkpoint.keep=2", "eval.every=0",
    "eval.max_batches=2",
    "data.block_docs=32",
]


@dataclasses.dataclass
class Row:
    """One line of the report: a fault, how often it was injected and survived, and what was lost."""

    fault: str
    injected: int
    survived: int
    lost: str
    detail: str


def env(devices: int = 8, **extra) -> dict:
    e = dict(os.environ, **extra)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e.setdefault("JAX_PLATFORMS", "cpu")
    e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return e


def t2x(*args: str) -> list[str]:
    return [sys.executable, "-m", "t2x.cli", *args]


def train_cmd(run_dir, *overrides: str) -> list[str]:
    return t2x("train", CONFIG, *BASE, f"train.run_dir={run_dir}", *overrides)


# Runs a command with files limited to argv[1] bytes: past it a write fails with EFBIG,
# as on a full disk (Python ignores SIGXFSZ, which would otherwise end the process).
_LIMITED = ("import os, resource, sys; n = int(sys.argv[1]); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])")


def start(cmd: list[str], file_size_limit: int | None = None, **kw) -> subprocess.Popen:
    if file_size_limit:
        cmd = [sys.executable, "-c", _LIMITED, str(file_size_limit), *cmd]
    return subprocess.Popen(
        cmd, env=kw.pop("env", env()), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    proc = start(cmd, **kw)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def losses(run_dir) -> dict[int, float]:
    """Logged train losses by step; a ``resume`` record drops what a killed launch logged
    after the checkpoint it resumed from."""
    out: dict[int, float] = {}
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if record["split"] == "resume":
            out = {s: v for s, v in out.items() if s <= record["step"]}
        elif record["split"] == "train" and record.get("loss") is not None:
            out[record["step"]] = record["loss"]
    return out


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 300, poll: float = 0.002) -> bool:
    """Poll until ``predicate()``; False if ``proc`` ended or the time ran out first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def saving(run_dir) -> bool:
    """True while Orbax is writing a step (its temporary folder exists)."""
    folder = pathlib.Path(run_dir) / "checkpoints"
    try:
        return any("orbax-checkpoint-tmp" in p.name for p in folder.iterdir())
    except FileNotFoundError:
        return False


def final_state(run_dir, *overrides: str, step: int | None = None):
    """The newest (or ``step``'s) checkpoint of a run, verified and restored in this process."""
    from t2x.checkpoint import Checkpointer
    from t2x.components import build
    from t2x.config import load_config
    from t2x.models import abstract_params
    from t2x.parallel import sharding_context
    from t2x.train.resume import Target, restore_step
    from t2x.train.state import make_optimizer, state_shardings

    cfg = load_config(CONFIG, [*BASE, f"train.run_dir={run_dir}", *overrides])
    c = build(cfg)
    tx, _ = make_optimizer(cfg)
    with sharding_context(c.mesh):
        abstract, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        _, logical = abstract_params(c.model, cfg.data.seq_len)
        ckpt = Checkpointer(pathlib.Path(run_dir) / "checkpoints", read_only=True)
        return restore_step(ckpt, ckpt.check_step(step), cfg, {}, Target(abstract, shardings, logical, c.mesh)).state


# Softmax ignores the key projection's bias: its gradient is zero but for rounding, and
# Adam turns that rounding into full-size steps, so its value depends on reduction order.
_ORDER_DEPENDENT = "['key']['bias']"


def same_state(a, b, state_rtol: float = 0.0) -> bool:
    """Bitwise equal; or, with ``state_rtol``, every array within that relative distance
    (by norm) of the other's, the key bias aside (see _ORDER_DEPENDENT)."""
    import jax
    import numpy as np

    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    if len(leaves_a) != len(leaves_b):
        return False
    for (path, x), y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        if not state_rtol:
            if not np.array_equal(x, y):
                return False
        elif _ORDER_DEPENDENT not in jax.tree_util.keystr(path):
            x, y = x.astype(np.float64), y.astype(np.float64)
            if np.linalg.norm(x - y) > state_rtol * np.linalg.norm(y):
                return False
    return True


def nothing_lost(run_dir, reference, *overrides: str, rtol: float = 0.0, state_rtol: float = 0.0) -> str:
    """'none' when every step's loss and the final parameters and optimizer state are
    the reference's: bitwise, or losses within ``rtol`` and state within ``state_rtol``
    (two processes reduce in another order than one, and 30 steps of training amplify
    the difference); otherwise what differs."""
    import numpy as np

    got, want = losses(run_dir), losses(reference)
    if sorted(got) != sorted(want):
        return f"logged steps differ: {sorted(set(got) ^ set(want))[:5]}"
    differ = [s for s in sorted(want) if not np.isclose(got[s], want[s], rtol=rtol, atol=0) and got[s] != want[s]]
    if differ:
        return f"losses differ at steps {differ[:5]}"
    if not same_state(final_state(run_dir, *overrides), final_state(reference, *overrides), state_rtol):
        return "final state differs"
    if rtol == 0 and state_rtol == 0:
        return "none"
    return (f"none (every loss within {rtol:g} of one process's, relatively; every array of the final state "
            f"within {state_rtol:g} by norm, the key bias aside)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])
