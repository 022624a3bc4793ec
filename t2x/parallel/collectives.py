"""What a compiled step sends between devices, read from its HLO, and what the mesh's
parallelism predicts it sends.

``collectives(hlo_text)`` lists every collective of an XLA program (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute) with its payload bytes and
group size; ``wire_bytes`` turns a collective into the bytes each device sends under the
usual ring (bandwidth-optimal) algorithms. ``predicted_payloads`` is the model the
performance page scales with: per train step of a decoder on a data x fsdp x tensor
mesh, gradients are all-reduced over the data axis, parameters all-gathered and their
gradients reduce-scattered over the fsdp axis, and each block's two row-parallel
products all-reduce activations over the tensor axis, forward and backward.
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"=\s*(?P<shape>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                 r"(?P<op>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[[^\]]*\](?:T\([^)]*\))?\))?"
                          r"\s*\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    payload_bytes: int  # the full array reduced or gathered (all-reduce, all-gather: its result;
    # reduce-scatter: its operand; all-to-all, collective-permute: what one device holds)
    group_size: int  # devices taking part in each group


def _array_bytes(shape: str) -> list[int]:
    sizes = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        sizes.append(n * _BYTES[dtype])
    return sizes


def _group_size(line: str, kind: str) -> int:
    if kind == "collective-permute":
        return 2
    match = _MESH_GROUPS.search(line)  # mesh['axis_0'=8,'axis_1'=2] {'axis_0'}: over the named axes
    if match:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(1)))
        axes = re.findall(r"'([^']+)'", match.group(2))
        size = 1
        for axis in axes:
            size *= int(sizes[axis])
        return size
    match = _IOTA_GROUPS.search(line)
    if match:
        return int(match.group(2))
    match = _LIST_GROUPS.search(line)
    if match:
        return len([x for x in match.group(1).split(",") if x])
    raise ValueError(f"no replica groups in: {line.strip()[:200]}")


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s")
_CALLEES = re.compile(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _callee_names(line: str) -> list[str]:
    """The computations an instruction calls: a loop's body and condition, a fusion's or
    reduction's computation, a conditional's branches."""
    names = _CALLEES.findall(line)
    for group in _BRANCHES.findall(line):
        names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """The module's computations (name -> instruction lines) and the entry's name."""
    computations: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            match = _HEADER.match(line)
            current = match.group(1) if match else None
            if current is not None:
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations, entry


def _executions(computations: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of the entry: a while loop's
    body and condition as often as its known trip count (1 if unknown)."""
    runs = {name: 0 for name in computations}
    runs[entry] = 1
    order, seen = [], set()

    def visit(name: str) -> None:  # callers before callees (HLO calls form a DAG)
        if name in seen or name not in computations:
            return
        seen.add(name)
        for line in computations[name]:
            for callee in _callees(line):
                visit(callee[0])
        order.append(name)

    def _callees(line: str) -> list[tuple[str, int]]:
        times = 1
        if " while(" in line:
            trip = _TRIP_COUNT.search(line)
            times = int(trip.group(1)) if trip else 1
        return [(n, times) for n in _callee_names(line)]

    visit(entry)
    for name in reversed(order):
        for line in computations[name]:
            for callee, times in _callees(line):
                if callee in runs:
                    runs[callee] += runs[name] * times
    return runs


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective the HLO module text (``compiled.as_text()``) runs per execution,
    one entry per run: a collective inside a loop (a scanned layer's) once per trip. An
    asynchronous one is counted at its ``-start``."""
    computations, entry = _computations(hlo_text)
    runs = _executions(computations, entry)
    found = []
    for name, lines in computations.items():
        for line in lines:
            collective = _collective(line)
            if collective is not None:
                found += [collective] * runs.get(name, 0)
    return found


def _collective(line: str) -> Collective | None:
    match = _OP.search(line)
    if not match:
        return None
    kind, sizes = match.group("op"), _array_bytes(match.group("shape"))
    if match.group("start") and kind in ("all-gather", "collective-permute") and len(sizes) >= 2:
        sizes = sizes[len(sizes) // 2:]  # (operands, results): the results
    group = _group_size(line, kind)
    total = sum(sizes)
    if kind == "reduce-scatter":
        total *= group  # the result is one group member's share of the operand
    return Collective(kind, total, group)


_ASSIGNED = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPERAND = re.compile(r"%([\w.\-]+)")


def assigned_and_operands(line: str) -> tuple[str, list[str]] | None:
    """An HLO instruction line's name and the names it reads (its operands and called
    computations, before its metadata), or None for a line that assigns nothing."""
    match = _ASSIGNED.match(line)
    if not match:
        return None
    name = match.group(1)
    return name, [n for n in _OPERAND.findall(line[match.end():].split(", metadata=")[0]) if n != name]


def unordered_collectives(hlo_text: str) -> list[tuple[str, str]]:
    """Collectives of a scheduled HLO module (``compiled.as_text()``) that XLA:CPU may run
    out of order, as (loop, instruction) pairs: a while loop that runs collectives, and a
    collective (or another such loop) after it in its computation's schedule that does
    not wait for the loop's results. XLA:CPU starts the instructions after a loop once
    the loop has started rather than finished, so the devices of a program can meet in
    different collectives (``t2x.models.transformer.scan_unroll``). A CPU program over
    several devices should have none."""
    computations, _ = _computations(hlo_text)
    holds: dict[str, bool] = {}

    def calls_collectives(line: str) -> bool:
        return any(runs_collectives(name) for name in _callee_names(line))

    def runs_collectives(name: str) -> bool:
        if name not in holds:
            holds[name] = False  # HLO calls form a DAG; this only guards a malformed text
            holds[name] = any(_OP.search(line) or calls_collectives(line) for line in computations.get(name, []))
        return holds[name]

    found = []
    for lines in computations.values():
        order, operands = [], {}
        for line in lines:
            parsed = assigned_and_operands(line)
            if parsed:
                name, reads = parsed
                order.append((name, line))
                operands[name] = set(reads)
        for i, (loop, line) in enumerate(order):
            if " while(" not in line or not calls_collectives(line):
                continue
            waits = {loop}  # what waits for the loop's results; a schedule lists operands first
            for name, later in order[i + 1:]:
                if operands[name] & waits:
                    waits.add(name)
                elif _OP.search(later) or calls_collectives(later):
                    found.append((loop, name))
    return found


def wire_bytes(c: Collective) -> float:
    """Bytes each device sends for ``c`` under ring algorithms: an all-reduce is a
    reduce-scatter then an all-gather, 2 (g - 1) / g of the payload; an all-gather,
    reduce-scatter or all-to-all (g - 1) / g; a permute the whole."""
    g = c.group_size
    if g <= 1:
        return 0.0
    if c.kind == "all-reduce":
        return 2 * (g - 1) / g * c.payload_bytes
    if c.kind == "collective-permute":
        return float(c.payload_bytes)
    return (g - 1) / g * c.payload_bytes


def payloads_by_kind(found: list[Collective], min_bytes: int = 0) -> dict[str, int]:
    """Total payload bytes of each kind of collective (those of at least ``min_bytes``)."""
    out: dict[str, int] = {}
    for c in found:
        if c.group_size > 1 and c.payload_bytes >= min_bytes:
            out[c.kind] = out.get(c.kind, 0) + c.payload_bytes
    return out


def _shards(spec, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Mesh axes (and their sizes) a parameter's PartitionSpec splits it over."""
    out = {}
    for axes in spec:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            out[axis] = mesh_shape[axis]
    return out


def predicted_payloads(params: dict, specs: dict, mesh_shape: dict[str, int], cfg, batch: int, seq_len: int,
                       grad_bytes: int = 4) -> dict[str, dict[str, float]]:
    """Payload bytes of one decoder train step's collectives, by kind and by the mesh axes
    they run over ("data", "fsdp", "data+fsdp", "tensor"; ``group_size`` gives their
    devices), from the parallelism alone (parameters ``params`` with their
    PartitionSpecs ``specs`` over mesh axis names):

    - gradients: each device's gradient shard is summed over the batch axes. A parameter
      split over ``fsdp`` is reduce-scattered over it (payload: its shard over the other
      axes), then all-reduced over ``data`` (its fsdp shard); one replicated over ``fsdp``
      is all-reduced over ``data x fsdp`` at once.
    - parameters split over ``fsdp`` are all-gathered before use: once per step
      (``all_gather_passes``: twice when the backward gathers again), at the compute
      dtype's bytes at best and float32's at worst: the prediction gives the float32
      single-pass figure.
    - ``tensor``: each block's attention and MLP output products sum partial products over
      the heads and MLP features forward (two all-reduces of the block's [rows, seq,
      d_model] activations), and backward the input gradients of the q, k, v and MLP
      input products (four: XLA reduces q's, k's and v's apart); two more for the
      vocabulary-split embedding (its lookup, and the input gradient of the tied
      unembedding): 6 layers + 2 a step.
    - a tied embedding's gradient has two parts (the lookup's and the output
      projection's), which XLA reduces apart: its reduction counts twice.
    """
    import jax
    import numpy as np

    d, f, t = (mesh_shape.get(a, 1) for a in ("data", "fsdp", "tensor"))
    out: dict[str, dict[str, float]] = {}

    def add(kind: str, axes: str, nbytes: float) -> None:
        if group_size(axes, mesh_shape) > 1 and nbytes:
            out.setdefault(kind, {})
            out[kind][axes] = out[kind].get(axes, 0.0) + nbytes

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec))
    for (path, leaf), spec in zip(flat, flat_specs):
        size = int(np.prod(leaf.shape)) * grad_bytes
        split = _shards(spec or (), mesh_shape)
        other = int(np.prod([n for a, n in split.items() if a != "fsdp"] or [1]))
        # the tied table's two gradients (lookup, output projection) are reduced apart
        times = 2 if cfg.tie_embeddings and jax.tree_util.keystr(path) == "['embed']['embedding']" else 1
        if "fsdp" in split:
            add("all-gather", "fsdp", size / other)
            add("reduce-scatter", "fsdp", times * size / other)
            add("all-reduce", "data", times * size / other / f)
        else:
            add("all-reduce", "data+fsdp", times * size / other)
    rows = batch / (d * f)
    compute_bytes = 2 if cfg.dtype == "bfloat16" else 4
    add("all-reduce", "tensor", (6 * cfg.num_layers + 2) * rows * seq_len * cfg.d_model * compute_bytes)
    return out


def group_size(axes: str, mesh_shape: dict[str, int]) -> int:
    """Devices in each group of a collective over ``axes`` ("data+fsdp": both)."""
    size = 1
    for axis in axes.split("+"):
        size *= mesh_shape.get(axis, 1)
    return size


def by_group(predicted: dict[str, dict[str, float]], mesh_shape: dict[str, int]) -> dict[str, dict[int, float]]:
    """``predicted_payloads`` summed by kind and group size, as the HLO shows them."""
    out: dict[str, dict[int, float]] = {}
    for kind, axes in predicted.items():
        for name, nbytes in axes.items():
            g = group_size(name, mesh_shape)
            out.setdefault(kind, {})[g] = out.get(kind, {}).get(g, 0.0) + nbytes
    return out
