"""Training throughput of a config on whatever devices are present.

Runs the real jitted train step (same model, optimizer and shardings as ``t2x train``)
on synthetic token batches, so the numbers measure the model step, not the input
pipeline. Prints tokens/s, achieved model FLOP/s per device, MFU, step and compile time,
and peak memory, then the same as one JSON line.

    python benchmarks/throughput.py configs/gpt2_small.yaml data.seq_len=512 train.global_batch_size=8
    python benchmarks/throughput.py configs/tiny.yaml --steps 50 --peak-flops 1e12
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import numpy as np

from t2x.config import load_config
from t2x.flops import peak_flops_per_device, training_flops_per_step
from t2x.models import build_model
from t2x.objectives import causal_lm
from t2x.parallel import host_to_global, make_mesh, process_rows, sharding_context
from t2x.models import count_params
from t2x.train.state import init_state, make_optimizer, state_shardings
from t2x.train.step import jit_train_step, make_train_step


def synthetic_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Rows of random tokens, each one whole document."""
    return {
        "tokens": rng.integers(4, vocab_size, (rows, seq_len), dtype=np.int32),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "num_bytes": np.zeros((rows,), np.int32),
    }


def _peak_memory_bytes(compiled) -> dict[str, int]:
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per device for MFU")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    batch_size, seq_len = cfg.train.global_batch_size, cfg.data.seq_len
    mesh = make_mesh(cfg.mesh)
    model = build_model(cfg.model)
    tx, schedule = make_optimizer(cfg)
    rng = np.random.default_rng(0)
    with sharding_context(mesh):
        _, shardings = state_shardings(model, tx, mesh, seq_len)
        state = init_state(model, tx, shardings, cfg.train.seed, seq_len)
        step = jit_train_step(make_train_step(model, tx, schedule, cfg, lambda b, rng: causal_lm(b, bos_id=2)), shardings, mesh)
        local_rows = len(process_rows(mesh, batch_size))

        def batch():
            return host_to_global(synthetic_batch(rng, local_rows, seq_len, cfg.model.vocab_size), mesh, batch_size)

        first = batch()
        t0 = time.perf_counter()
        compiled = step.lower(state, first).compile()
        compile_seconds = time.perf_counter() - t0
        for _ in range(args.warmup):
            state, metrics = compiled(state, first)
        jax.block_until_ready(metrics)
        batches = [batch() for _ in range(min(args.steps, 4))]
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - t0) / args.steps

    device = jax.devices()[0]
    flops = training_flops_per_step(cfg.model, batch_size, seq_len)
    flops_per_device = flops / seconds / jax.device_count()
    peak = peak_flops_per_device(device.device_kind, args.peak_flops or cfg.train.peak_flops_per_device)
    result = {
        "config": cfg.name,
        "device": f"{jax.device_count()} x {device.device_kind}",
        "params": count_params(state.params),
        "global_batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": cfg.model.dtype,
        "mesh": dict(mesh.shape),
        "step_seconds": seconds,
        "tokens_per_second": batch_size * seq_len / seconds,
        "model_tflops_per_second_per_device": flops_per_device / 1e12,
        "mfu": flops_per_device / peak if peak else None,
        "compile_seconds": compile_seconds,
        **_peak_memory_bytes(compiled),
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        print(f"{key:<{width}}  {shown if value is not None else 'n/a (pass --peak-flops)'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
