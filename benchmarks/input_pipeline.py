"""Throughput of the input pipeline next to the train step it feeds.

Reads training batches for this process exactly as ``t2x train`` does (raw text read,
tokenized on the fly, packed into the family's rows, shuffled, batched), with no model,
and prints rows/s and tokens/s (padding excluded), CPU use, the bytes read from storage,
the time to the first batch, and the cost of resuming from a position deep into the
data. Then it times the config's train step (``t2x bench``) and prints the tokens/s it
consumes and how many times over the pipeline can feed it.

    python benchmarks/input_pipeline.py configs/tiny.yaml --batches 200
    python benchmarks/input_pipeline.py configs/gpt2_small.yaml data.seq_len=512 train.global_batch_size=4 \
        model.dtype=float32 --step-steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import statistics

from t2x import hostmem
from t2x.bench import StepBench
from t2x.config import load_config
from t2x.data import Source, load_tokenizer
from t2x.data.pipeline import TrainBatches, check_data
from t2x.families import task


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--batches", type=int, default=200, help="batches timed")
    parser.add_argument("--step-steps", type=int, default=10, help="train steps timed (0: no step)")
    args = parser.parse_args(argv)
    hostmem.keep_freed_memory()  # as t2x's command line does

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    source = Source(cfg.data, "train")
    check_data(source, cfg.data, every_shard=True)
    batch_size = cfg.train.global_batch_size
    rows = task(cfg).rows(cfg, tokenizer)

    t0 = time.perf_counter()
    batches = TrainBatches(source, tokenizer, cfg.data, batch_size, cfg.train.seed, range(batch_size), None, rows)
    next(batches)
    first_batch_seconds = time.perf_counter() - t0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(args.batches):
        tokens += int((next(batches)["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)

    t0 = time.perf_counter()
    resumed = TrainBatches(source, tokenizer, cfg.data, batch_size, cfg.train.seed, range(batch_size), batches.positions,
                           rows)
    next(resumed)
    resume_seconds = time.perf_counter() - t0

    result = {
        "config": cfg.name,
        "source": source.description,
        "global_batch_size": batch_size,
        "seq_len": cfg.data.seq_len,
        "num_shards": cfg.data.num_shards,
        "batches_per_second": args.batches / seconds,
        "tokens_per_second": tokens / seconds,
        "cpu_seconds_per_second": (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / seconds,
        "bytes_read": batches.stats.bytes_read,
        "first_batch_seconds": first_batch_seconds,
        "resume_first_batch_seconds": resume_seconds,
        "resumed_after_batches": args.batches + 1,
        **batches.stats.as_dict(),
    }
    batches.close()
    resumed.close()
    if args.step_steps:
        step = StepBench(cfg)
        step.run(2)
        step_tokens = step.tokens_per_step / statistics.median(step.run(args.step_steps))
        result["step_tokens_per_second"] = step_tokens
        result["pipeline_over_step"] = result["tokens_per_second"] / step_tokens
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:,.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
