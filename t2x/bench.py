"""``t2x bench``: how fast a config's train step runs on the devices present.

It runs the real jitted train step (the model, optimizer, shardings and donation of
``t2x train``) on synthetic rows made by the config's own family (random tokens packed
the way the pipeline packs documents, span-corrupted for an encoder-decoder), so it
measures the step, not the input pipeline, and needs no data. Reported: tokens/s, model
TFLOP/s per device (``t2x.flops``), MFU against the device's peak (tabulated, given, or
this machine's measured float32 matmul peak), the median and mean step time, compile
time, and peak device and host memory.

Nothing here imports TensorFlow: it runs where only jax, flax, optax and orbax are.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from t2x.config import Config, ConfigError
from t2x.data.packing import RowFormat
from t2x.data.tokenizer import Tokenizer


def synthetic_rows(row_format: RowFormat, tokenizer: Tokenizer, rows: int, seq_len: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``rows`` full rows of ``row_format``'s features from documents of random tokens
    (ids past the tokenizer's specials), packed by the family's own packer."""
    low = max(tokenizer.bos_id, tokenizer.eos_id, 3) + 1
    out: dict[str, list[np.ndarray]] = {}
    have = 0
    while have < rows:
        lengths = rng.geometric(1 / seq_len, size=4 * rows) + 1
        documents = [rng.integers(low, tokenizer.vocab_size, n).tolist() for n in lengths]
        token_bytes = [np.ones(n + 1, np.int64) for n in lengths]
        packed = row_format.pack(documents, token_bytes, seq_len, tokenizer, rng)
        keep = len(packed["segment_ids"]) - 1  # the last row of a block may be partly empty
        for name, value in packed.items():
            out.setdefault(name, []).append(np.asarray(value)[:keep])
        have += keep
    return {name: np.concatenate(parts)[:rows].astype(np.int32) for name, parts in out.items()}


def matmul_peak_flops(size: int = 2048, dtype=jnp.float32, seconds: float = 2.0) -> float:
    """FLOP/s of XLA's ``size``-square ``dtype`` matrix multiply on the first device, the
    best of repeated timings over about ``seconds``: the practical peak a train step's
    model FLOP/s are compared with on hardware that has no published one. The product
    is accumulated and returned in float32, as a train step's are (and the only form of
    a bfloat16 product XLA:CPU runs on bfloat16 matrix units)."""
    device = jax.devices()[0]
    a, b = (jax.device_put(jnp.asarray(np.random.default_rng(i).standard_normal((size, size)), dtype), device)
            for i in range(2))
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def _memory(compiled) -> dict[str, int]:
    stats = jax.local_devices()[0].memory_stats() or {}
    out = {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    analysis = compiled.memory_analysis()
    if analysis is not None:
        out["step_arguments_bytes"] = int(analysis.argument_size_in_bytes)
        out["step_temporaries_bytes"] = int(analysis.temp_size_in_bytes)
    out["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


@dataclasses.dataclass
class StepBench:
    """A config's train step, compiled, with its state and synthetic batches: ``run(n)``
    times ``n`` steps. Built once, it can be timed in several rounds (between a peer's).
    ``rows``: this process's rows of the batches to cycle through (default: ``batches``
    synthetic ones)."""

    cfg: Config
    devices: list | None = None
    batches: int = 4
    rows: list[dict[str, np.ndarray]] | None = None

    def __post_init__(self):
        from t2x.components import build
        from t2x.families import task
        from t2x.parallel import host_to_global, process_rows, sharding_context
        from t2x.train.state import init_state, make_optimizer, state_shardings
        from t2x.train.step import jit_train_step, make_train_step

        cfg = self.cfg
        if cfg.classify.enabled:
            raise ConfigError("t2x bench measures pretraining steps; drop classify.labels (a classifier's step is its "
                              "family's backbone with a small head)")
        c = build(cfg, devices=self.devices)
        self.mesh, self.model, self.bos_id = c.mesh, c.model, c.tokenizer.bos_id
        fam = task(cfg)
        row_format = fam.rows(cfg, c.tokenizer)
        batch_size, seq_len = cfg.train.global_batch_size, cfg.data.seq_len
        self.target_len = row_format.lengths.get("targets")
        tx, schedule = make_optimizer(cfg)
        rng = np.random.default_rng(cfg.train.seed)
        rows = len(process_rows(c.mesh, batch_size))
        with sharding_context(c.mesh):
            _, shardings = state_shardings(c.model, tx, c.mesh, seq_len)
            self.state = init_state(c.model, tx, shardings, cfg.train.seed, seq_len)
            step = jit_train_step(make_train_step(c.model, tx, schedule, cfg, fam.objective(cfg, c.tokenizer)),
                                  shardings, c.mesh)
            self.host_batches = self.rows or [synthetic_rows(row_format, c.tokenizer, rows, seq_len, rng)
                                              for _ in range(self.batches)]
            self.device_batches = [host_to_global(b, c.mesh, batch_size) for b in self.host_batches]
            t0 = time.perf_counter()
            self.compiled = step.lower(self.state, self.device_batches[0]).compile()
            self.compile_seconds = time.perf_counter() - t0

    def run(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` steps (each waited for, so none overlaps the next)."""
        from t2x.parallel import sharding_context

        times = []
        with sharding_context(self.mesh):
            for i in range(steps):
                t0 = time.perf_counter()
                self.state, metrics = self.compiled(self.state, self.device_batches[i % len(self.device_batches)])
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
            if steps:
                self.last_metrics = jax.tree.map(float, jax.device_get(metrics))
        return times

    def trace(self, steps: int) -> tuple[list[float], str]:
        """``run(steps)`` under XLA's profiler: the steps' seconds and the path of the
        perfetto trace (``.json.gz``) written to a new temporary folder."""
        import glob
        import tempfile

        folder = tempfile.mkdtemp(prefix="t2x-trace-")
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            times = self.run(steps)
        traces = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        if not traces:
            raise RuntimeError(f"XLA's profiler wrote no perfetto trace under {folder}")
        return times, traces[0]

    @property
    def flops_per_step(self) -> float:
        from t2x.flops import run_flops_per_step

        return run_flops_per_step(self.cfg, target_len=self.target_len)

    @property
    def tokens_per_step(self) -> int:
        """Input tokens of a global batch (an encoder-decoder's encoder rows)."""
        return self.cfg.train.global_batch_size * self.cfg.data.seq_len


def bench(cfg: Config, steps: int = 10, warmup: int = 2, peak_flops: float | None = None,
          measure_peak: bool = False) -> dict:
    """Time ``steps`` train steps of ``cfg`` after ``warmup`` untimed ones (see the module
    docstring). ``peak_flops``: the device's peak FLOP/s for MFU (default: tabulated by
    device kind, else ``train.peak_flops_per_device``); ``measure_peak``: also measure this
    machine's float32 matmul peak and report the step's FLOP/s as a fraction of it."""
    from t2x.flops import peak_flops_per_device
    from t2x.models import count_params

    if steps < 1 or warmup < 0:
        raise ConfigError(f"t2x bench: --steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    b = StepBench(cfg)
    b.run(warmup)
    times = b.run(steps)
    median = statistics.median(times)
    device = jax.devices()[0]
    flops_per_device = b.flops_per_step / median / jax.device_count()
    peak = peak_flops_per_device(device.device_kind, peak_flops or cfg.train.peak_flops_per_device)
    result = {
        "config": cfg.name,
        "family": cfg.model.family,
        "device": f"{jax.device_count()} x {device.device_kind}",
        "params": count_params(b.state.params),
        "global_batch_size": cfg.train.global_batch_size,
        "seq_len": cfg.data.seq_len,
        **({"target_len": b.target_len} if b.target_len else {}),
        "dtype": cfg.model.dtype,
        "mesh": dict(b.mesh.shape),
        "steps": steps,
        "step_seconds_median": median,
        "step_seconds_mean": statistics.fmean(times),
        "tokens_per_second": b.tokens_per_step / median,
        "model_tflops_per_second_per_device": flops_per_device / 1e12,
        "mfu": flops_per_device / peak if peak else None,
        "compile_seconds": b.compile_seconds,
        "loss": b.last_metrics.get("loss"),
        **_memory(b.compiled),
    }
    if measure_peak:
        matmul = matmul_peak_flops()
        result["matmul_peak_tflops"] = matmul / 1e12
        result["fraction_of_matmul_peak"] = flops_per_device / matmul
    return result
