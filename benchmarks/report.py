"""Regenerate the measured section of docs/performance.md on this machine, in one command.

Runs every CPU measurement of the performance page, each in a process of its own and one
after another (so none shares the CPU with another), keeps each one's command and JSON
output in ``benchmarks/results/cpu-DATE.jsonl``, and rewrites the part of
``docs/performance.md`` between its ``report:begin`` and ``report:end`` markers: the
date, the machine (CPU, cores, library versions, XLA's and PyTorch's float32
matrix-multiply peaks), then for each measurement its exact command and the figures it
printed, and for each lever its before and after, measured in the same run.

    python benchmarks/report.py                      # everything: about 105 minutes on 2 cores
    python benchmarks/report.py --only compressor quickstart levers
    python benchmarks/report.py --render FILE.jsonl  # rewrite the page from a saved run

The peer comparisons need ``torch`` (CPU build) and ``transformers``; without them they
fail, and the page says so with their error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

from peers import SMALL as PEER_SMALL  # this folder, on the path of a script run from it

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"

# The peers' ``small`` shape on the built-in corpus, as a t2x config's overrides.
SMALL = [*PEER_SMALL, "mesh.data=1", "data.num_shards=1", "model.dtype=float32"]
BENCH = ["t2x", "bench", "configs/tiny.yaml", *SMALL, "model.remat=none", "model.scan_layers=true", "--steps", "10"]


PEER_KEYS = ("shape", "t2x_tokens_per_second", "torch_tokens_per_second", "ratio", "t2x_of_xla_peak",
             "torch_of_torch_peak", "loss_t2x", "loss_torch")


@dataclasses.dataclass(frozen=True)
class Measurement:
    name: str
    what: str
    command: list[str]
    keys: tuple[str, ...]  # figures of its JSON output shown on the page ("a.b" reaches into a dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)


MEASUREMENTS = [
    Measurement("peers_small", "t2x next to transformers' GPT-2 (same weights, batches, optimizer), layers unrolled",
                ["python", "benchmarks/peers.py", "--shapes", "small", "--t2x", "model.scan_layers=false"], PEER_KEYS),
    Measurement("peers_small_same_malloc", "the same with the peer keeping freed memory as t2x does",
                ["python", "benchmarks/peers.py", "--shapes", "small", "--t2x", "model.scan_layers=false",
                 "--peer-malloc", "keep"], PEER_KEYS),
    Measurement("peers_small_scanned", "the same with t2x's default, scanned layers",
                ["python", "benchmarks/peers.py", "--shapes", "small"], PEER_KEYS),
    Measurement("peers_gpt2_small", "the same at GPT-2 small (124M), sequence 512, batch 4, layers unrolled",
                ["python", "benchmarks/peers.py", "--shapes", "gpt2_small", "--t2x", "model.scan_layers=false"],
                PEER_KEYS),
    Measurement("peers_bert_small", "t2x next to transformers' BertForMaskedLM (the small shape, masked LM on "
                "t2x's own masks), layers unrolled",
                ["python", "benchmarks/peers.py", "--shapes", "bert_small", "--t2x", "model.scan_layers=false"],
                PEER_KEYS),
    Measurement("peers_t5_small", "t2x next to transformers' T5ForConditionalGeneration (the small shape, 6 + 6 "
                "layers, span corruption), layers unrolled",
                ["python", "benchmarks/peers.py", "--shapes", "t5_small", "--t2x", "model.scan_layers=false"],
                PEER_KEYS),
    Measurement("compressor", "general-purpose compressors on the built-in held-out split, trained text as dictionary",
                ["python", "benchmarks/compressor.py"], ("compressor", "held_out_bits_per_byte")),
    Measurement("quickstart", "the README's main command: held-out bits per byte and wall time",
                ["t2x", "train", "configs/tiny.yaml", "train.run_dir={tmp}/quickstart"],
                ("wall_seconds", "bits_per_byte", "step", "tokens_per_second")),
    Measurement("input_pipeline", "tokens/s from raw text (tokenized on the fly) over tokens/s of the same config's step",
                ["python", "benchmarks/input_pipeline.py", "configs/tiny.yaml"],
                ("tokens_per_second", "step_tokens_per_second", "pipeline_over_step", "bytes_read")),
    Measurement("checkpoint", "an async save every 20 steps against none; GPT-2 small state saved and restored",
                ["python", "benchmarks/checkpoint.py", "configs/tiny.yaml", *SMALL, "--steps", "80", "--every", "20"],
                ("throughput.throughput_with_saves_over_without", "save_and_restore.save_returns_seconds",
                 "save_and_restore.save_on_disk_seconds", "save_and_restore.restore_seconds")),
]

STEP_KEYS = ("step_seconds_median", "tokens_per_second", "compile_seconds")

class Lever(typing.NamedTuple):
    """A change to a ``t2x bench`` command (``BENCH``, of SMALL, unless named):
    overrides and environment before and after."""

    what: str
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    env_after: dict[str, str] = {}
    env_before: dict[str, str] = {}
    bench: tuple[str, ...] = tuple(BENCH)


LEVERS = {
    "kept_memory": Lever("glibc keeps freed memory for the next step (t2x's default on a CPU, `t2x.hostmem`) instead "
                         "of unmapping it and faulting it in again", env_before={"T2X_HOST_MALLOC": "system"}),
    "unrolled": Lever("layers unrolled instead of scanned in a loop (`model.scan_layers=false`)",
                      before=("model.scan_unroll=1",), after=("model.scan_layers=false",)),
    "remat_full": Lever("rematerialize every layer (`model.remat=full`): memory for compute", after=("model.remat=full",)),
    "eigen_dots": Lever("XLA's Eigen matmuls instead of YNNPACK dot fusions",
                        env_after={"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}),
    "onednn": Lever("XLA with oneDNN (`--xla_cpu_use_onednn=true`)", env_after={"XLA_FLAGS": "--xla_cpu_use_onednn=true"}),
    "loss_chunks": Lever("the loss's logits 64 positions of each row at a time (`train.loss_chunk_len=64`), never the "
                         "whole batch's", after=("train.loss_chunk_len=64",)),
    "scan_unroll": Lever("the scanned layers' loop unrolled (`model.scan_unroll` unset, the default on a CPU: 6 "
                         "here), the parameters still stacked", before=("model.scan_unroll=1",)),
    "bfloat16": Lever("bfloat16 compute (`model.dtype=bfloat16`; parameters and optimizer float32), its dense products "
                      "on the CPU's bfloat16 matrix units where it has them (AMX)",
                      after=("model.dtype=bfloat16",)),
    "mlm_chosen": Lever("BERT's masked-LM head at each row's chosen positions (the default `objective.max_predictions`: "
                        "40 of bert_tiny's 128) instead of every position", before=("objective.max_predictions=0",),
                        bench=("t2x", "bench", "configs/bert_tiny.yaml", "mesh.data=1", "data.num_shards=1",
                               "--steps", "10")),
}


def machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
             "python": platform.python_version(), "jax": jax.__version__}
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        facts["torch"] = None
    from t2x.bench import matmul_peak_flops

    facts["xla_matmul_tflops"] = round(matmul_peak_flops() / 1e12, 4)
    return facts


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = 7200) -> dict:
    """One measurement in a process of its own: its JSON lines, seconds and exit status."""
    argv = [sys.executable, *command[1:]] if command[0] == "python" else command
    if argv[0] == "t2x":
        argv = [sys.executable, "-m", "t2x.cli", *argv[1:]]
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    record = {"returncode": done.returncode, "wall_seconds": round(time.perf_counter() - t0, 1),
              "outputs": _json_lines(done.stdout)}
    if done.returncode:
        record["error"] = done.stderr[-2000:]
    return record


def measure(m: Measurement, tmp: str) -> dict:
    command = [part.format(tmp=tmp) for part in m.command]
    record = run(command, m.env)
    if m.name == "quickstart" and not record["returncode"]:
        metrics = [json.loads(line) for line in open(os.path.join(tmp, "quickstart", "metrics.jsonl"))]
        last_eval = [x for x in metrics if x.get("split") == "eval"][-1]
        last_train = [x for x in metrics if x.get("split") == "train"][-1]
        record["outputs"] = [{"wall_seconds": record["wall_seconds"], "bits_per_byte": last_eval["bits_per_byte"],
                              "step": last_eval["step"], "tokens_per_second": last_train["tokens_per_second"]}]
    return {"name": m.name, "what": m.what, "command": shlex.join(m.command), "env": m.env, **record}


def measure_lever(name: str, rounds: int) -> dict:
    """``rounds`` alternating processes of the step before and after the lever: this
    machine's speed wanders between minutes, so one of each would compare moments."""
    lever = LEVERS[name]
    firsts, seconds = [], []
    for _ in range(rounds):
        firsts.append(run([*lever.bench, *lever.before], lever.env_before))
        seconds.append(run([*lever.bench, *lever.after], lever.env_after))

    def summary(records):
        outs = [(r["outputs"] or [{}])[-1] for r in records]
        steps = [o["step_seconds_median"] for o in outs if "step_seconds_median" in o]
        compiles = [o["compile_seconds"] for o in outs if "compile_seconds" in o]
        return {"step_seconds_median": statistics.median(steps) if steps else None, "step_seconds_each": steps,
                "compile_seconds": min(compiles) if compiles else None}

    def described(env, overrides):
        return " ".join([*(f"{k}={v}" for k, v in env.items()), *overrides]) or "default"

    return {"name": f"lever:{name}", "what": lever.what, "rounds": rounds,
            "before_command": shlex.join([*lever.bench, *lever.before]),
            "change": f"{described(lever.env_before, lever.before)} -> {described(lever.env_after, lever.after)}",
            "before": summary(firsts), "after": summary(seconds),
            "returncode": max(r["returncode"] for r in firsts + seconds)}


def _get(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "" if value is None else str(value)


def render(records: list[dict]) -> str:
    facts = next((r for r in records if r.get("name") == "machine"), {})
    lines = [BEGIN, "",
             f"Generated by `python benchmarks/report.py` on {facts.get('date', '?')}: {facts.get('cpu', '?')}, "
             f"{facts.get('cores', '?')} cores, Python {facts.get('python', '?')}, jax {facts.get('jax', '?')}, "
             f"torch {facts.get('torch') or 'absent'}; XLA's float32 matmul peak on this machine "
             f"{_fmt(facts.get('xla_matmul_tflops'))} TFLOP/s (best 2048^3 product). Raw output: "
             f"`{facts.get('results', '?')}`.", ""]
    by_name = {m.name: m for m in MEASUREMENTS}
    for r in records:
        m = by_name.get(r.get("name"))
        if m is None:
            continue
        lines += [f"**{m.name}**: {m.what}.", "", "```bash", r["command"], "```", ""]
        if r.get("returncode"):
            lines += [f"Did not finish (exit {r['returncode']}): `{(r.get('error') or '').strip().splitlines()[-1:]}`", ""]
            continue
        rows = [o for o in r["outputs"] if any(_get(o, k) is not None for k in m.keys)]
        if m.name.startswith("peers"):
            machine_line = next((o for o in r["outputs"] if "torch_matmul_tflops" in o), None)
            if machine_line:
                lines += [f"Matmul peaks this run: XLA {_fmt(machine_line['xla_matmul_tflops'])}, PyTorch "
                          f"{_fmt(machine_line['torch_matmul_tflops'])} TFLOP/s.", ""]
        lines += ["| " + " | ".join(m.keys) + " |", "|" + " --- |" * len(m.keys)]
        lines += ["| " + " | ".join(_fmt(_get(o, k)) for k in m.keys) + " |" for o in rows]
        lines += [""]
    levers = [r for r in records if str(r.get("name", "")).startswith("lever:")]
    if levers:
        lines += [f"**levers**: `t2x bench` of the peers' small shape (float32, remat none, scanned, 10 steps) "
                  "unless its command below names another, "
                  f"before and after each lever in {levers[0].get('rounds', 1)} alternating rounds of a process "
                  "each; the median of each side's median steps (every round's in the raw output):", "",
                  "| lever | change | step before (s) | step after (s) | after / before | compile before, after (s) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in levers:
            b, a = r["before"].get("step_seconds_median"), r["after"].get("step_seconds_median")
            ratio = f"{a / b:.3f}" if a and b else ""
            lines.append(f"| {r['what']} | `{r['change']}` | {_fmt(b)} | {_fmt(a)} | {ratio} | "
                         f"{_fmt(r['before'].get('compile_seconds'))}, {_fmt(r['after'].get('compile_seconds'))} |")
        if len({r["before_command"] for r in levers}) == 1:
            lines += ["", f"Before, every lever: `{levers[0]['before_command']}`.", ""]
        else:
            lines += ["", "Before each lever:", "",
                      *(f"- {r['name'].split(':', 1)[1]}: `{r['before_command']}`" for r in levers), ""]
    lines.append(END)
    return "\n".join(lines)


def write_page(block: str, page: Path = PAGE) -> None:
    text = page.read_text()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        raise SystemExit(f"{page} has no {BEGIN} ... {END} block to rewrite; add the two markers where it belongs")
    page.write_text(text)


def main(argv: list[str] | None = None) -> None:
    names = [m.name for m in MEASUREMENTS] + ["levers"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=names, help="measurements to run (default: all)")
    parser.add_argument("--levers", nargs="*", choices=list(LEVERS), default=list(LEVERS))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each lever's before and after")
    parser.add_argument("--render", metavar="FILE.jsonl", help="rewrite the page from a saved run; run nothing")
    parser.add_argument("--out", help="results file (default: benchmarks/results/cpu-DATE.jsonl)")
    parser.add_argument("--no-page", action="store_true", help="record the results, leave the page as it is")
    args = parser.parse_args(argv)
    if args.render:
        records = [json.loads(line) for line in open(args.render) if line.strip()]
        write_page(render(records))
        return
    facts = {"name": "machine", **machine()}
    out = Path(args.out or REPO / "benchmarks" / "results" / f"cpu-{facts['date']}.jsonl").resolve()
    facts["results"] = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [facts]
    chosen = args.only if args.only is not None else names
    with tempfile.TemporaryDirectory() as tmp, open(out, "w") as f:
        f.write(json.dumps(facts) + "\n")
        for m in MEASUREMENTS:
            if m.name in chosen:
                print(f"{m.name}: {shlex.join(m.command)}", flush=True)
                records.append(measure(m, tmp))
                f.write(json.dumps(records[-1]) + "\n")
                f.flush()
        if "levers" in chosen:
            for name in args.levers:
                print(f"lever {name}", flush=True)
                records.append(measure_lever(name, args.rounds))
                f.write(json.dumps(records[-1]) + "\n")
                f.flush()
    print(f"results: {out}")
    if not args.no_page:
        write_page(render(records))
        print(f"rewrote the measured section of {PAGE}")
    failed = [r["name"] for r in records[1:] if r.get("returncode")]
    if failed:
        raise SystemExit(f"did not finish: {', '.join(failed)} (their errors are in {out})")


if __name__ == "__main__":
    main()
