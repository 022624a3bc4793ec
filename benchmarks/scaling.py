"""A model of multi-host scaling over data x fsdp x tensor meshes: for each model, chip
count and interconnect, the mesh that fits in memory with the highest predicted MFU.

    python benchmarks/scaling.py [--chips 8 64 1024] [--single-chip-mfu 0.40] [--json]

Per train step and chip:

- **compute**: the step's model FLOPs (``t2x.flops``, the MFU convention) over the chip's
  peak times the MFU one chip reaches alone (``--single-chip-mfu``; 0.40 is GPT-2 XL's on
  an H200, ``docs/performance.md``).
- **collectives**: ``t2x.parallel.collectives.predicted_payloads`` of the model's
  parameters under the mesh (gradients reduced over data and fsdp, parameters gathered
  over fsdp, activations all-reduced over tensor; tested against the compiled step's
  HLO on 8 CPU devices), turned into bytes on the wire per chip by ring algorithms, over
  the bandwidth of the links the axis runs on.
- **overlap**: data and fsdp collectives overlap the compute (XLA schedules them
  asynchronously); tensor all-reduces sit between a layer's products and do not. Step
  time = max(compute, data + fsdp) + tensor; predicted MFU = single-chip MFU x compute /
  step time.
- **memory**: float32 parameters, gradients and Adam's two moments (16 bytes a
  parameter) split over fsdp x tensor, plus the activations ``model.remat=dots_no_batch``
  keeps (each block's matmul outputs in bfloat16, split over tensor) for one
  micro-batch, under 90% of HBM: the fewest micro-batches (``train.grad_accum_steps``)
  that fit, each of which gathers and reduces again.

The meshes tried: tensor 1 to 8 (within a node: it must divide the heads), fsdp any power
of two, data the rest, every chip holding at least one row of the global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bfloat16 per chip
    hbm_bytes: float
    tensor_bandwidth: float  # bytes/s each chip sends on the links a tensor-axis ring uses
    data_bandwidth: float  # the same for data and fsdp rings across nodes (or the pod)
    node: int  # chips that share the tensor axis's fast links


HARDWARE = [
    # TPU v5p: 4,800 Gbit/s of inter-chip interconnect a chip over six links of a 3-D torus;
    # a ring along one torus dimension uses two of them (about 200 GB/s) on every axis.
    Hardware("TPU v5p (ICI)", 459e12, 95e9, 200e9, 200e9, 8960),
    # H100 SXM: NVLink 4 within 8 GPUs (450 GB/s each way); across nodes one 400 Gbit/s NIC a GPU.
    Hardware("H100 (NVLink + 400 Gb/s)", 989e12, 80e9, 450e9, 50e9, 8),
]

MODELS = {  # name: (config, overrides, global batch rows)
    "GPT-2 XL (1.5B), seq 1024": ("gpt2_xl.yaml", ["data.seq_len=1024"], 512),
    "7B (GPT-3 6.7B shape), seq 2048": ("gpt2_xl.yaml", ["model.d_model=4096", "model.num_layers=32",
                                                          "model.num_heads=32", "model.d_ff=16384",
                                                          "model.max_seq_len=2048", "data.seq_len=2048"], 1024),
}


def abstract_params(cfg):
    """Parameter shapes and their PartitionSpecs over mesh axis names (no devices needed)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from t2x.models import build_model
    from t2x.parallel.sharding import LOGICAL_RULES

    model = build_model(cfg.model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda rng: model.init(rng, tokens)["params"], jax.random.key(0))
    logical = nn.get_partition_spec(boxed)
    specs = jax.tree.map(lambda spec: nn.logical_to_mesh_axes(spec, LOGICAL_RULES), logical,
                         is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return nn.unbox(boxed), specs


def predict(cfg, params, specs, hw: Hardware, chips: int, rows: int, single_chip_mfu: float):
    import jax
    import numpy as np

    from t2x.flops import training_flops_per_step
    from t2x.parallel.collectives import Collective, group_size, predicted_payloads, wire_bytes

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    seq, m = cfg.data.seq_len, cfg.model
    compute = training_flops_per_step(m, rows, seq) / chips / (hw.peak_flops * single_chip_mfu)
    best = None
    for tensor in (1, 2, 4, 8):
        if tensor > min(chips, hw.node) or m.num_heads % tensor or chips % tensor:
            continue
        fsdp = 1
        while fsdp <= chips // tensor:
            data = chips // (tensor * fsdp)
            if data * fsdp * tensor == chips and rows % (data * fsdp) == 0:
                mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
                state = 16 * n_params / (fsdp * tensor)
                per_chip_rows = rows // (data * fsdp)
                accum = 1  # the fewest micro-batches (train.grad_accum_steps) whose activations fit
                while True:
                    activations = m.num_layers * per_chip_rows // accum * seq * (5 * m.d_model + m.d_ff) * 2 / tensor
                    if state + activations <= 0.9 * hw.hbm_bytes or per_chip_rows % (2 * accum):
                        break
                    accum *= 2
                if state + activations <= 0.9 * hw.hbm_bytes:
                    payloads = predicted_payloads(params, specs, mesh, m, rows, seq)
                    times = {"tensor": 0.0, "data+fsdp": 0.0}
                    for kind, over in payloads.items():
                        for axes, nbytes in over.items():
                            wire = wire_bytes(Collective(kind, int(nbytes), group_size(axes, mesh)))
                            if axes == "tensor":
                                times["tensor"] += wire / hw.tensor_bandwidth
                            else:  # once per micro-batch: the accumulation loop reduces and gathers in each
                                bandwidth = hw.tensor_bandwidth if chips <= hw.node else hw.data_bandwidth
                                times["data+fsdp"] += accum * wire / bandwidth
                    step = max(compute, times["data+fsdp"]) + times["tensor"]
                    result = {"chips": chips, "mesh": mesh, "grad_accum_steps": accum,
                              "mfu": single_chip_mfu * compute / step,
                              "step_seconds": step, "compute_seconds": compute,
                              "data_fsdp_seconds": times["data+fsdp"], "tensor_seconds": times["tensor"],
                              "memory_gb": (state + activations) / 1e9}
                    if best is None or result["mfu"] > best["mfu"] + 1e-9:
                        best = result
            fsdp *= 2
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    from t2x.config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chips", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--single-chip-mfu", type=float, default=0.40)
    parser.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    args = parser.parse_args(argv)
    out = []
    for name, (config, overrides, rows) in MODELS.items():
        cfg = load_config(os.path.join(REPO, "configs", config),
                          [*overrides, f"train.global_batch_size={rows}", "data.tokenizer=builtin:4096"])
        params, specs = abstract_params(cfg)
        for hw in HARDWARE:
            if not args.json:
                print(f"\n{name}, batch {rows} x {cfg.data.seq_len}, {hw.name}\n")
                print("| chips | mesh (data, fsdp, tensor) | micro-batches | predicted MFU | step (s) | compute (s) | "
                      "data + fsdp collectives (s) | tensor collectives (s) | memory a chip (GB) |")
                print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for chips in args.chips:
                r = predict(cfg, params, specs, hw, chips, rows, args.single_chip_mfu)
                if r is None:
                    line = {"model": name, "hardware": hw.name, "chips": chips, "fits": False}
                    if not args.json:
                        print(f"| {chips} | none fits (memory, or rows and heads too few to split) | | | | | | | |")
                else:
                    line = {"model": name, "hardware": hw.name, **r}
                    if not args.json:
                        mesh = r["mesh"]
                        print(f"| {chips} | {mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} | {r['grad_accum_steps']} | "
                              f"{r['mfu']:.1%} | "
                              f"{r['step_seconds']:.3f} | {r['compute_seconds']:.3f} | {r['data_fsdp_seconds']:.3f} | "
                              f"{r['tensor_seconds']:.3f} | {r['memory_gb']:.1f} |")
                if args.json:
                    print(json.dumps(line))
                out.append(line)
    return out


if __name__ == "__main__":
    main()
