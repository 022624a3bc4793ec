"""Where a train step's time goes on a CPU, by part of the model.

XLA's profiler (``jax.profiler.trace``) records each kernel XLA:CPU runs, but on a
2-core machine two kernels often run side by side, and the matrix products XLA hands to
its library (entry-level ``dot`` instructions) return at once and finish on the thread
pool, marked only by an ``end:`` event. Summing event durations therefore counts some
time twice and some not at all. This script divides the step's wall time instead: each
moment is shared equally among the kernels running then (a library product from its
start to its ``end:``), and moments when none runs are ``idle``. Each kernel is assigned
to a part of the model by its HLO instruction's ``op_name`` (the Flax module path):

- ``attention projections``: the query, key, value and output products of any attention;
- ``attention``: the rest of attention (scores, softmax, weighted values, layout copies);
- ``mlp``, ``norms``, ``embedding``;
- ``other model products``: products elsewhere in the model (the vocabulary projection);
- ``loss``: the objective outside the model (softmax cross-entropy over the logits);
- ``optimizer and the rest``: kernels outside the model (clipping, AdamW, metrics).

Each part also gets the floating-point operations of its matrix products, read from the
compiled HLO (2 x output size x contracted size, batched products included), and so its
achieved GFLOP/s; for reference, the script measures XLA's float32 matmul peak on this
machine (a 2048^3 product) in the same process. Forward and backward are told apart by
``transpose(`` in the op name (JAX's transposition of the forward). No loop may be left
in the step: scanned layers are unrolled on a CPU by default (``model.scan_unroll``), or
set ``model.scan_layers=false``; a loop's kernels are not attributed.

    python benchmarks/cpu_profile.py configs/gpt2_small.yaml model.dtype=float32 ... [--steps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import sys

from t2x import hostmem

PARTS = ("mlp", "attention projections", "attention", "other model products", "norms", "embedding", "loss",
         "optimizer and the rest", "idle")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = ")
_SHAPE = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\), "
                  r"(?:lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{([\d,]*)\}")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def hlo_instructions(hlo: str) -> dict[str, dict]:
    """The entry computation's instructions of an HLO module's text: for each, its
    ``op_name`` (for a fusion holding a product, the product's; for an instruction XLA
    left without one, that of its first operand having one), whether it is a library
    product (a ``dot`` at entry level) and the FLOPs of the products in it or in what it
    calls (fusions)."""
    from t2x.parallel.collectives import assigned_and_operands  # after hostmem's setting, as JAX

    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.split()
            current = header[1] if header[0] == "ENTRY" else header[0]
            current = current.lstrip("%")
            computations[current] = []
            if header[0] == "ENTRY":
                entry = current
        elif current is not None and _INSTRUCTION.match(line):
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    flops_of: dict[str, int] = {}
    dot_names: dict[str, str] = {}  # a computation's first product's op_name

    def flops(name: str) -> int:
        if name in flops_of:
            return flops_of[name]
        flops_of[name] = 0  # no recursion through cycles
        shapes = {m.group(1): _dims(m.group(2)) for m in map(_SHAPE.match, computations.get(name, [])) if m}
        total = 0
        for line in computations.get(name, []):
            own, called = _dot_flops(line, shapes), re.findall(r"calls=%([\w.\-]+)", line)
            total += own + sum(map(flops, called))
            op = re.search(r'op_name="([^"]+)"', line)
            if own and op and name not in dot_names:
                dot_names[name] = op.group(1)
            for c in called:
                if c in dot_names and name not in dot_names:
                    dot_names[name] = dot_names[c]
        flops_of[name] = total
        return total

    shapes = {m.group(1): _dims(m.group(2)) for m in map(_SHAPE.match, computations[entry]) if m}
    found = {}
    for line in computations[entry]:
        name = _INSTRUCTION.match(line).group(1)
        op = re.search(r'op_name="([^"]+)"', line)
        called = re.findall(r"calls=%([\w.\-]+)", line)
        product_name = next((dot_names[c] for c in called if flops(c) and c in dot_names), None)
        # A fusion holding a product is named by it (its root may be an epilogue's reduce).
        op_name = product_name or (op.group(1) if op else "")
        if not op_name:  # e.g. the loss's sum of exponentials as a product with ones, left unnamed
            operands = assigned_and_operands(line)[1]
            op_name = next((found[o]["op_name"] for o in operands if found.get(o, {}).get("op_name")), "")
        found[name] = {"op_name": op_name, "library_dot": bool(_DOT.match(line)),
                       "flops": _dot_flops(line, shapes) + sum(map(flops, called))}
    return found


def _dot_flops(line: str, shapes: dict[str, list[int]]) -> int:
    """2 x output size x contracted size of a ``dot`` instruction's line (0 for another)."""
    dot = _DOT.match(line)
    if not dot or dot.group(2) not in shapes:
        return 0
    lhs = shapes[dot.group(2)]
    return 2 * math.prod(_dims(dot.group(1))) * math.prod(lhs[d] for d in _dims(dot.group(3)))


def part_of(op_name: str, is_product: bool) -> str:
    """The part of the model (``PARTS``) an instruction's ``op_name`` belongs to."""
    inside = op_name.split("/", 1)[1] if "/" in op_name else op_name  # drop jit(step)
    in_model = bool(re.search(r"\(jvp\([A-Z]\w*\)\)|jvp\([A-Z]\w*\)", inside))
    if not in_model:
        return "loss" if "jvp(" in inside else "optimizer and the rest"
    if re.search(r"norm\w*/", inside):  # attn_norm, mlp_norm, final_norm
        return "norms"
    if re.search(r"attn\w*/(query|key|value|out|qkv)/", inside):
        return "attention projections"
    if re.search(r"attn\w*/", inside):
        return "attention"
    if "/mlp/" in inside:
        return "mlp"
    if "/embed" in inside:
        return "embedding"
    return "other model products" if is_product else "optimizer and the rest"


def attribute(events: list[dict], instructions: dict[str, dict], steps: int) -> dict[str, dict]:
    """Wall milliseconds per step of each part (see the module docstring), forward and
    backward apart, from a trace's complete (``X``) events."""
    events = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    ends: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e["ts"] + e["dur"])
    points = []
    for e in events:
        info = instructions.get(e["name"])
        if info is None:
            continue
        start, stop = e["ts"], e["ts"] + e["dur"]
        if info["library_dot"]:
            later = [t for t in ends.get(e["name"], []) if t >= start]
            stop = min(later) if later else stop
        points += [(start, 1, e["name"]), (stop, -1, e["name"])]
    if not points:
        raise ValueError("the trace has no events of the step's HLO instructions")
    points.sort()
    wall: dict[tuple[str, str], float] = collections.Counter()
    running: collections.Counter = collections.Counter()
    last = points[0][0]
    for at, change, name in points:
        if running:
            share = (at - last) / sum(running.values())
            for other, count in running.items():
                info = instructions[other]
                part = part_of(info["op_name"], info["flops"] > 0)
                key = (part, "" if part == "optimizer and the rest" else
                       "backward" if "transpose(" in info["op_name"] else "forward")
                wall[key] += share * count
        elif at > last:
            wall[("idle", "")] += at - last
        last = at
        running[name] += change
        if running[name] == 0:
            del running[name]
    flops: dict[str, int] = collections.Counter()
    for info in instructions.values():
        flops[part_of(info["op_name"], info["flops"] > 0)] += info["flops"]
    out = {}
    for part in PARTS:
        fwd, bwd = wall.get((part, "forward"), 0.0), wall.get((part, "backward"), 0.0)
        total = fwd + bwd + wall.get((part, ""), 0.0)
        out[part] = {"ms": total / steps / 1e3, "forward_ms": fwd / steps / 1e3, "backward_ms": bwd / steps / 1e3,
                     "gflop": flops.get(part, 0) / 1e9}
    return out


PRODUCTS = ("mlp", "attention projections", "other model products")  # the parts that are large products


def trace_parts(bench, steps: int) -> dict:
    """Trace ``steps`` steps of a built ``t2x.bench.StepBench``: their seconds, the parts'
    shares of them (``attribute``) and the trace's path."""
    step_seconds, path = bench.trace(steps)
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {"step_seconds": step_seconds, "parts": attribute(events, hlo_instructions(bench.compiled.as_text()), steps),
            "trace": path}


def profile(cfg, steps: int) -> dict:
    from t2x.bench import StepBench, matmul_peak_flops
    from t2x.models.transformer import loop_left

    if loop_left(cfg.model):
        raise SystemExit(f"cpu_profile.py: model.scan_unroll={cfg.model.scan_unroll} leaves the scanned layers in an "
                         "XLA while loop, whose kernels this script does not attribute: leave it unset (the whole "
                         "stack on a CPU) or set model.scan_layers=false")
    bench = StepBench(cfg)
    bench.run(2)
    return {**trace_parts(bench, steps), "xla_matmul_peak_tflops": matmul_peak_flops() / 1e12}


def table(result: dict) -> str:
    parts = result["parts"]
    total = sum(p["ms"] for p in parts.values())
    rows = ["| part | ms a step | share | forward ms | backward ms | GFLOP | GFLOP/s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in sorted(parts.items(), key=lambda kv: -kv[1]["ms"]):
        if p["ms"] < 0.5 and not p["gflop"]:
            continue
        rate = f"{p['gflop'] / p['ms'] * 1e3:.0f}" if p["gflop"] >= 0.05 and p["ms"] else ""
        split = (f"{p['forward_ms']:.0f} | {p['backward_ms']:.0f}" if p["forward_ms"] or p["backward_ms"] else " | ")
        rows.append(f"| {name} | {p['ms']:.0f} | {100 * p['ms'] / total:.1f}% | {split} | {p['gflop']:.1f} | {rate} |")
    steps = ", ".join(f"{s:.3f}" for s in result["step_seconds"])
    return "\n".join(rows) + (f"\n\nsteps traced: {steps} s; kernels' wall time {total / 1e3:.3f} s a step; "
                              f"XLA float32 matmul peak here {result['xla_matmul_peak_tflops'] * 1e3:.0f} GFLOP/s")


def main(argv: list[str] | None = None) -> dict:
    hostmem.keep_freed_memory()  # before JAX starts: as t2x's commands run
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--steps", type=int, default=3, help="steps traced (after 2 untraced)")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    from t2x.config import load_config

    result = profile(load_config(args.config, args.overrides), args.steps)
    result["command"] = " ".join(["python", "benchmarks/cpu_profile.py", *(argv if argv is not None else sys.argv[1:])])
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
