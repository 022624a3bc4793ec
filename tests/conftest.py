"""Test set-up: 8 virtual CPU devices, before JAX loads. No persistent compilation cache:
the tests' programs run over several CPU devices, and such programs must not be read back
from it (see ``t2x.parallel.mesh.keep_cpu_collectives_in_order``)."""

import os
import pathlib
import tempfile

# The tests compile hundreds of small programs and run each for a few steps: LLVM's
# cheaper pipeline compiles them about a third faster, whole files of tests included.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + TEST_XLA_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = pathlib.Path(os.environ.get("T2X_TEST_CACHE") or pathlib.Path(tempfile.gettempdir()) / "t2x-test-cache")
os.environ.setdefault("T2X_CACHE_DIR", str(_CACHE))  # the built-in corpus and tokenizers
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from t2x.hostmem import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as t2x's command line does: before JAX's threads exist

import jax  # noqa: E402
import pytest  # noqa: E402

from t2x.config import Config, load_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent

# What every family's tiny test config shares: the quickstart's run shrunk to a model that
# compiles and steps in well under a second.
TINY_COMMON = [
    "model.vocab_size=512",
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.d_ff=64",
    "model.max_seq_len=32",
    "data.tokenizer=builtin:512",
    "data.seq_len=32",
    "data.block_docs=16",
    "data.num_shards=2",
    "train.global_batch_size=8",
    "train.steps=4",
    "train.log_every=1",
    "train.progress_bar=false",
    "train.sample_tokens=0",
    "optim.warmup_steps=1",
    "checkpoint.every=2",
    "eval.every=0",
    "eval.max_batches=2",
]
# The tests' decoder: GPT-2-shaped layers, scanned (the quickstart's own are Llama-shaped and
# unrolled; tests that need those ask for them).
GPT2_LAYERS = ["model.position=learned", "model.norm=layernorm", "model.mlp=gelu", "model.scan_layers=true"]
TINY = [*TINY_COMMON, *GPT2_LAYERS]


def tiny_config(run_dir, *overrides: str) -> Config:
    """The tiny test config writing into ``run_dir``, with extra overrides."""
    return load_config(REPO / "configs" / "tiny.yaml", [*TINY, f"train.run_dir={run_dir}", *overrides])


def restored(run_dir, *overrides: str, step=None, devices=None, make=tiny_config):
    """The train state a run saved (the newest step, or ``step``), verified and restored
    onto the mesh of the config ``make(run_dir, *overrides)`` (the tiny config's by
    default); and its data item."""
    from t2x.checkpoint import Checkpointer
    from t2x.components import build
    from t2x.models import abstract_params
    from t2x.parallel import sharding_context
    from t2x.train.resume import Target, restore_step
    from t2x.train.state import make_optimizer, state_shardings

    cfg = make(run_dir, *overrides)
    c = build(cfg, devices=devices)
    tx, _ = make_optimizer(cfg)
    with sharding_context(c.mesh):
        abstract, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        _, logical = abstract_params(c.model, cfg.data.seq_len)
        checkpointer = Checkpointer(pathlib.Path(run_dir) / "checkpoints", read_only=True)
        resumed = restore_step(checkpointer, checkpointer.check_step(step), cfg, {}, Target(abstract, shardings, logical, c.mesh))
    return resumed.state, resumed.data_state


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the default in pyproject.toml): one worker per core, at most 4; each
    worker is a JAX process with 8 virtual devices, and some tests start two more."""
    return max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX loads"
