"""On an NVIDIA GPU, in one command: cuDNN attention checked against XLA, the attention
kernels timed, and ``t2x bench`` of the configs that the performance page reports.

    python benchmarks/gpu.py --tokenizer PATH [--out DIR] [--budget SECONDS] [--only NAME ...]

1. **Correctness.** cuDNN's fused attention as t2x calls it (packed segments, causal or
   not, multi-head and grouped-query; also the dense-mask path) against XLA computing the
   same attention in float32 from the same bfloat16 inputs: relative error
   ||out - ref|| / ||ref|| of the output and of the gradients of q, k and v, over every
   token (a row's padding attends its padding under both). XLA's own bfloat16 result is
   measured the same way beside it, as the scale to read the errors by.
2. **Attention kernels**, forward and backward at GPT-2 small's shape (batch 16, sequence
   1024, 12 heads of 64): XLA under the dense mask, cuDNN with packed segments (several
   room sizes), cuDNN with the mask as a bias; median milliseconds.
3. **Train steps**: ``t2x.bench.bench`` of each entry of ``BENCHES`` (the real jitted
   train step on synthetic rows), each in a fresh process so that one's memory does not
   crowd the next; entries past ``--budget`` seconds are skipped and say so.
4. **Profiles** (``--profile NAME ...``): XLA's profile of three steps of an entry,
   device time per step by kind of kernel and the costliest kernels.

Needs jax with CUDA, flax, optax, orbax, sentencepiece and omegaconf; no TensorFlow. The
tokenizer (a SentencePiece model, e.g. the built-in ``builtin:4096`` one from this
machine's cache) only sets the synthetic tokens' range: the models keep their
configs' vocabulary sizes. Every result is printed as a JSON line and, with ``--out``,
written to ``DIR/gpu.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (config, overrides[, environment]); run in this order, as far as the budget goes
BENCHES = {
    "gpt2_small_b32": ("gpt2_small.yaml", ["train.global_batch_size=32", "model.remat=none"]),
    "gpt2_small_b32_xla": ("gpt2_small.yaml", ["train.global_batch_size=32", "model.remat=none",
                                               "model.attention=xla"]),
    "gpt2_xl_b16": ("gpt2_xl.yaml", ["train.global_batch_size=16"]),
    "bert_base_b64": ("bert_base.yaml", ["train.global_batch_size=64", "model.remat=none"]),
    "t5_base_b64": ("t5_base.yaml", ["train.global_batch_size=64", "model.remat=none"]),
    "gpt2_xl_b8_none": ("gpt2_xl.yaml", ["train.global_batch_size=8", "model.remat=none"]),
    "gpt2_small_b64": ("gpt2_small.yaml", ["train.global_batch_size=64", "model.remat=none"]),
    # levers, each against its line above
    "gpt2_small_b32_unrolled": ("gpt2_small.yaml", ["train.global_batch_size=32", "model.remat=none",
                                                    "model.scan_layers=false"]),
    "gpt2_small_b32_no_triton_gemm": ("gpt2_small.yaml", ["train.global_batch_size=32", "model.remat=none"],
                                      {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}),
    "bert_base_b64_no_dropout": ("bert_base.yaml", ["train.global_batch_size=64", "model.remat=none",
                                                    "model.dropout=0"]),
    "bert_base_b64_rbg": ("bert_base.yaml", ["train.global_batch_size=64", "model.remat=none",
                                             "train.dropout_rng=rbg"]),
    "t5_base_b64_rbg": ("t5_base.yaml", ["train.global_batch_size=64", "model.remat=none", "train.dropout_rng=rbg"]),
    "gpt2_xl_b24": ("gpt2_xl.yaml", ["train.global_batch_size=24"]),
    "bert_base_b64_every_position": ("bert_base.yaml", ["train.global_batch_size=64", "model.remat=none",
                                                        "objective.max_predictions=0"]),
    "bert_base_b64_unrolled": ("bert_base.yaml", ["train.global_batch_size=64", "model.remat=none",
                                                  "model.scan_layers=false"]),
    "t5_base_b64_unrolled": ("t5_base.yaml", ["train.global_batch_size=64", "model.remat=none",
                                              "model.scan_layers=false"]),
    "gpt2_xl_b32": ("gpt2_xl.yaml", ["train.global_batch_size=32"]),
    "gpt2_xl_b8_s2048": ("gpt2_xl.yaml", ["train.global_batch_size=8", "data.seq_len=2048",
                                          "model.max_seq_len=2048"]),
}


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(os.path.join(out, "gpu.jsonl"), "a") as f:
            f.write(line + "\n")


def environment() -> dict:
    import jax

    record = {"what": "environment", "jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
              "backend": jax.default_backend()}
    try:
        from jax._src.lib import cuda_versions

        record["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        record["cudnn"] = repr(e)
    return record


def random_segments(rng, batch: int, seq_len: int, padded_rows: int):
    """Packed rows: runs of random lengths numbered 1, 2, ..., the first ``padded_rows``
    rows ending in padding (0)."""
    import numpy as np

    ids = np.zeros((batch, seq_len), np.int32)
    for row in range(batch):
        end = seq_len - (rng.integers(1, seq_len // 4) if row < padded_rows else 0)
        cuts = np.sort(rng.choice(np.arange(1, end), rng.integers(1, 6), replace=False))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, end])):
            ids[row, a:b] = i + 1
    return ids


PATHS = ("packed", "many runs", "dense mask")


def check_attention(out: str | None, paths=PATHS) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from t2x.models.attention import attention_mask, cudnn_attention

    rng = np.random.default_rng(0)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    for causal in (True, False):
        for heads, kv_heads in ((12, 12), (12, 4)):
            for path in paths:
                batch, seq_len, head_dim = 4, 1024, 64
                segments = random_segments(rng, batch, seq_len, padded_rows=2)
                if path == "many runs":  # more runs than PACKED_SEGMENTS: the masked way
                    segments[1] = np.repeat(np.arange(1, 41), -(-seq_len // 40))[:seq_len]
                segments = jnp.asarray(segments)
                mask = attention_mask(segments, seq_len, causal=causal)
                q, k, v, w = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in
                              [(batch, seq_len, heads, head_dim), (batch, seq_len, kv_heads, head_dim),
                               (batch, seq_len, kv_heads, head_dim), (batch, seq_len, heads, head_dim)])
                scale = head_dim**-0.5

                def cudnn(q, k, v):
                    if path == "dense mask":
                        return cudnn_attention(q, k, v, None, causal, scale, mask=mask)
                    return cudnn_attention(q, k, v, segments, causal, scale)

                def xla(q, k, v):
                    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")

                def grads(f, dtype):
                    def loss(q, k, v):
                        return jnp.sum(f(q, k, v).astype(jnp.float32) * w.astype(jnp.float32))
                    args = [x.astype(dtype) for x in (q, k, v)]
                    return jax.jit(lambda *a: (f(*a), *jax.grad(loss, argnums=(0, 1, 2))(*a)))(*args)

                record = {"what": "attention check", "causal": causal, "heads": heads, "kv_heads": kv_heads,
                          "path": path, "batch": batch, "seq_len": seq_len}
                try:
                    reference = grads(xla, jnp.float32)
                    got = grads(cudnn, jnp.bfloat16)
                    baseline = grads(xla, jnp.bfloat16)
                    names = ("out", "dq", "dk", "dv")
                    record["cudnn_rel_err"] = {n: rel(a, r) for n, a, r in zip(names, got, reference)}
                    record["xla_bf16_rel_err"] = {n: rel(a, r) for n, a, r in zip(names, baseline, reference)}
                    record["finite"] = bool(all(np.isfinite(np.asarray(a, np.float32)).all() for a in got))
                    record["ok"] = record["finite"] and all(
                        record["cudnn_rel_err"][n] <= max(2e-2, 3 * record["xla_bf16_rel_err"][n]) for n in names)
                except Exception as e:  # noqa: BLE001 - reported, the rest goes on
                    record["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                emit(record, out)


def time_attention(out: str | None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from t2x.models.attention import attention_mask, cudnn_attention

    rng = np.random.default_rng(1)
    batch, seq_len, heads, head_dim = 16, 1024, 12, 64
    segments = jnp.asarray(random_segments(rng, batch, seq_len, padded_rows=0))
    many = jnp.asarray(np.repeat(np.arange(1, 41), -(-seq_len // 40))[:seq_len][None].repeat(batch, 0))
    mask = attention_mask(segments, seq_len, causal=True)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, seq_len, heads, head_dim)), jnp.bfloat16) for _ in range(3))
    scale = head_dim**-0.5
    variants = {
        "xla dense mask": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                                                       implementation="xla"),
        "cudnn packed (t2x: room for 8 runs)": lambda q, k, v: cudnn_attention(q, k, v, segments, True, scale),
        "cudnn packed (room for 16 runs)": lambda q, k, v: cudnn_attention(q, k, v, segments, True, scale,
                                                                           max_segments=16),
        "cudnn packed (room for 64 runs)": lambda q, k, v: cudnn_attention(q, k, v, segments, True, scale,
                                                                           max_segments=64),
        "cudnn with 40 runs a row (t2x: mask as bias)": lambda q, k, v: cudnn_attention(q, k, v, many, True, scale),
        "cudnn mask as bias": lambda q, k, v: cudnn_attention(q, k, v, None, True, scale, mask=mask),
        "cudnn causal, no segments": lambda q, k, v: cudnn_attention(q, k, v, None, True, scale),
    }
    # causal: half the score matrix, forward (2 matmuls) and backward (5)
    flops = 7 * 2 * batch * heads * seq_len * seq_len * head_dim / 2
    for name, f in variants.items():
        step = jax.jit(jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)),
                                          argnums=(0, 1, 2)))
        record = {"what": "attention time", "variant": name, "batch": batch, "seq_len": seq_len, "heads": heads,
                  "head_dim": head_dim}
        try:
            jax.block_until_ready(step(q, k, v))
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                jax.block_until_ready(step(q, k, v))
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            record.update(ms_forward_backward=1e3 * median, causal_tflops=flops / median / 1e12)
        except Exception as e:  # noqa: BLE001
            record["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        emit(record, out)


def _config(name: str, tokenizer: str, extra: list[str]):
    from t2x.config import load_config

    config, overrides = BENCHES[name][:2]
    overrides = [*overrides, f"data.tokenizer={tokenizer}", "data.num_shards=1", *extra]
    return load_config(os.path.join(REPO, "configs", config), overrides), f"t2x bench configs/{config} " + " ".join(
        overrides)


def one_bench(name: str, tokenizer: str, extra: list[str]) -> dict:
    """``t2x.bench.bench`` of ``BENCHES[name]`` (run in a child process)."""
    from t2x.bench import bench

    cfg, command = _config(name, tokenizer, extra)
    result = bench(cfg, steps=10, warmup=2)
    env = BENCHES[name][2] if len(BENCHES[name]) > 2 else {}
    return {"what": "bench", "name": name, "command": " ".join([*(f"{k}={v}" for k, v in env.items()), command]),
            **result}


KERNEL_KINDS = [  # (kind, substrings of a device kernel's name), first match wins
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "matmul", "dot", "triton_gemm")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("reduction fusion", ("reduce", "reduction")),
    ("other fusion", ("fusion", "loop_", "triton", "wrapped_")),
]


def summarize_trace(path: str, steps: int) -> dict:
    """Device time per step by kind of kernel and the costliest kernels, from a perfetto
    trace of ``steps`` train steps (events of the processes named for a GPU)."""
    import gzip

    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in processes.items() if "gpu" in name.lower() or "device" in name.lower()}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device}
    streams = {key for key, name in threads.items() if "stream" in name.lower()}  # kernels, not XLA op spans

    def counted(e) -> bool:
        if not device:
            return True
        return (e.get("pid"), e.get("tid")) in streams if streams else e.get("pid") in device

    totals: dict[str, list] = {}
    for e in events:
        if e.get("ph") == "X" and counted(e):
            entry = totals.setdefault(e.get("name", "?"), [0.0, 0])
            entry[0] += float(e.get("dur", 0)) / 1e3
            entry[1] += 1
    kinds: dict[str, float] = {}
    for name, (ms, _) in totals.items():
        kind = next((k for k, keys in KERNEL_KINDS if any(x in name.lower() for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms / steps
    top = sorted(totals.items(), key=lambda item: -item[1][0])[:30]
    return {"processes": sorted(set(processes.values())), "device_threads": sorted(set(threads.values()))[:20],
            "device_ms_per_step": sum(kinds.values()),
            "ms_per_step_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms_per_step": [[name[:120], round(ms / steps, 3), n // steps] for name, (ms, n) in top]}


def one_profile(name: str, tokenizer: str, extra: list[str], steps: int = 3) -> dict:
    """XLA's profile of ``steps`` train steps of ``BENCHES[name]``, summarized."""
    from t2x.bench import StepBench

    cfg, command = _config(name, tokenizer, extra)
    b = StepBench(cfg)
    b.run(3)
    try:
        times, trace = b.trace(steps)
    except RuntimeError as e:
        return {"what": "profile", "name": name, "error": str(e)}
    return {"what": "profile", "name": name, "command": command, "step_seconds": times,
            **summarize_trace(trace, steps)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a SentencePiece .model for the synthetic tokens")
    parser.add_argument("--out", help="folder for gpu.jsonl")
    parser.add_argument("--budget", type=float, default=480, help="seconds; benches that would start later are skipped")
    parser.add_argument("--only", nargs="*", help="bench names to run (default: all, in order)")
    parser.add_argument("--skip-checks", action="store_true", help="benches only")
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS, help="attention paths checked")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every bench")
    parser.add_argument("--profile", nargs="*", default=[], help="bench names to profile (after the benches)")
    parser.add_argument("--bench", help=argparse.SUPPRESS)  # a child process's one bench
    parser.add_argument("--profile-one", help=argparse.SUPPRESS)  # a child process's one profile
    parser.add_argument("--checks", action="store_true", help=argparse.SUPPRESS)  # a child process's checks
    args = parser.parse_args(argv)
    if args.bench:
        print("RESULT " + json.dumps(one_bench(args.bench, args.tokenizer, args.set)), flush=True)
        return
    if args.profile_one:
        print("RESULT " + json.dumps(one_profile(args.profile_one, args.tokenizer, args.set)), flush=True)
        return
    if args.checks:
        emit(environment(), args.out)
        check_attention(args.out, args.paths)
        time_attention(args.out)
        return
    # every part in a process of its own, so that none holds device memory the next needs
    start = time.perf_counter()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    if not args.skip_checks:
        checks = [sys.executable, os.path.abspath(__file__), "--checks", "--tokenizer", args.tokenizer,
                  "--paths", *args.paths, *(["--out", args.out] if args.out else [])]
        done = subprocess.run(checks, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            emit({"what": "checks", "error": done.stderr[-1500:]}, args.out)
    parts = [("--bench", name) for name in (list(BENCHES) if args.only is None else args.only)]
    parts += [("--profile-one", name) for name in args.profile]
    for flag, name in parts:
        what = "profile" if flag == "--profile-one" else "bench"
        left = args.budget - (time.perf_counter() - start)
        if left < 30:
            emit({"what": what, "name": name, "skipped": f"budget of {args.budget:.0f} s spent"}, args.out)
            continue
        command = [sys.executable, os.path.abspath(__file__), flag, name, "--tokenizer", args.tokenizer,
                   "--set", *args.set]
        env = {**os.environ, **(BENCHES[name][2] if len(BENCHES[name]) > 2 else {})}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=left, env=env)
        except subprocess.TimeoutExpired:
            emit({"what": what, "name": name, "error": f"stopped at the budget ({left:.0f} s left)"}, args.out)
            continue
        results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if results:
            emit(json.loads(results[-1]), args.out)
        else:
            emit({"what": what, "name": name, "error": done.stderr[-1500:]}, args.out)


if __name__ == "__main__":
    main()
