"""What checkpointing costs a training run.

1. **Throughput.** ``t2x train`` of CONFIG for ``--steps`` steps, twice from fresh run
   directories: with an asynchronous save every ``--every`` steps, and with none before
   the last step. Reported: each run's mean step time over its logged windows after the
   first (compilation excluded), from ``metrics.jsonl``, and their ratio.
2. **Save and restore.** The train state (parameters and optimizer state) of
   ``--state-config`` (default GPT-2 small; the optimizer's moments filled with random
   values, as a trained state's, so that compression cannot shrink them) written by
   t2x's ``Checkpointer`` (with its checksums) and waited for, then restored onto the
   same shardings and verified: seconds of each, and the bytes on disk.

    python benchmarks/checkpoint.py configs/tiny.yaml [key=value ...] --steps 60 --every 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from t2x import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mean_step_seconds(run_dir: str) -> tuple[float, list[float]]:
    """Mean of the logged windows' step seconds after the first window."""
    windows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "train" and "step_seconds" in record:
                windows.append(record["step_seconds"])
    if len(windows) < 2:
        raise SystemExit(f"{run_dir}: fewer than two logged windows; raise --steps or lower train.log_every")
    return statistics.fmean(windows[1:]), windows


def throughput(config: str, overrides: list[str], steps: int, every: int, folder: str) -> dict:
    from t2x.config import load_config
    from t2x.train.loop import train

    result = {}
    for name, save_every in (("no saves", steps), (f"a save every {every} steps", every)):
        run_dir = os.path.join(folder, name.replace(" ", "_"))
        cfg = load_config(config, [*overrides, f"train.run_dir={run_dir}", f"train.steps={steps}",
                                   f"checkpoint.every={save_every}", f"eval.every={steps}", "train.sample_tokens=0",
                                   "train.progress_bar=false"])
        t0 = time.perf_counter()
        train(cfg)
        mean, windows = mean_step_seconds(run_dir)
        result[name] = {"mean_step_seconds": mean, "windows": windows, "wall_seconds": time.perf_counter() - t0}
        shutil.rmtree(run_dir, ignore_errors=True)
    saving, plain = result[f"a save every {every} steps"], result["no saves"]
    result["throughput_with_saves_over_without"] = plain["mean_step_seconds"] / saving["mean_step_seconds"]
    return result


def save_and_restore(config: str, overrides: list[str], folder: str) -> dict:
    import jax

    from t2x.checkpoint import Checkpointer
    from t2x.components import build
    from t2x.config import load_config
    from t2x.models import count_params
    from t2x.parallel import sharding_context
    from t2x.train.state import init_state, make_optimizer, state_shardings

    cfg = load_config(config, overrides)
    c = build(cfg)
    tx, _ = make_optimizer(cfg)
    with sharding_context(c.mesh):
        _, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        state = init_state(c.model, tx, shardings, cfg.train.seed, cfg.data.seq_len)
    # A fresh optimizer state is zeros, which compress to nothing: give it a trained
    # state's incompressible values.
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.opt_state))))
    opt_state = jax.tree.map(lambda x: x + 1e-3 * jax.random.normal(next(keys), x.shape, x.dtype)
                             if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, state.opt_state)
    arrays = {"params": state.params, "opt_state": opt_state}
    jax.block_until_ready(arrays)
    directory = os.path.join(folder, "checkpoints")
    checkpointer = Checkpointer(directory, cfg.checkpoint)
    t0 = time.perf_counter()
    checkpointer.save(1, arrays, {"config": {"name": cfg.name}})
    returned = time.perf_counter() - t0
    checkpointer.wait()
    saved = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), arrays)
    target = jax.tree.map(lambda x: x.sharding, arrays)
    t0 = time.perf_counter()
    restored = checkpointer.restore(1, abstract, target)
    jax.block_until_ready(restored)
    restore_seconds = time.perf_counter() - t0
    checkpointer.close()
    same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(arrays), jax.tree.leaves(restored)))
    return {"config": cfg.name, "params": count_params(state.params), "bytes_on_disk": size,
            "save_returns_seconds": returned, "save_on_disk_seconds": saved, "restore_seconds": restore_seconds,
            "restored_equal": same}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20, help="steps between saves in the saving run")
    parser.add_argument("--state-config", default=os.path.join(REPO, "configs", "gpt2_small.yaml"))
    parser.add_argument("--state-set", nargs="*", default=["data.tokenizer=builtin:4096", "mesh.data=1"],
                        metavar="key=value", help="overrides of --state-config")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    hostmem.keep_freed_memory()  # as t2x's command line does
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        if not args.skip_throughput:
            out["throughput"] = throughput(args.config, args.overrides, args.steps, args.every, folder)
            t = out["throughput"]
            print(f"mean step: {t['no saves']['mean_step_seconds']:.3f} s without saves, "
                  f"{t[f'a save every {args.every} steps']['mean_step_seconds']:.3f} s with a save every "
                  f"{args.every} steps: throughput x{t['throughput_with_saves_over_without']:.3f}")
        out["save_and_restore"] = s = save_and_restore(args.state_config, args.state_set, folder)
        print(f"{s['config']} state ({s['params']:,} parameters, {s['bytes_on_disk'] / 1e9:.2f} GB on disk): save "
              f"returns in {s['save_returns_seconds']:.2f} s, on disk in {s['save_on_disk_seconds']:.2f} s; "
              f"restore {s['restore_seconds']:.2f} s")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
