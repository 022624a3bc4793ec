"""benchmarks/cpu_profile.py: products' FLOPs read from compiled HLO, and the step's wall
time divided among the kernels running at each moment."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import cpu_profile  # noqa: E402


def test_products_flops_are_read_from_the_compiled_hlo():
    def f(x, w, q, k):
        with jax.named_scope("blocks/mlp/up"):
            h = jnp.tanh(x @ w)  # [64, 48] x [48, 80]
        with jax.named_scope("blocks/attn/scores"):
            s = jnp.einsum("bqd,bkd->bqk", q, k)  # batched: 6 x [16, 8] x [8, 24]
        return h.sum() + s.sum()

    args = (jnp.ones((64, 48)), jnp.ones((48, 80)), jnp.ones((6, 16, 8)), jnp.ones((6, 24, 8)))
    found = cpu_profile.hlo_instructions(jax.jit(f).lower(*args).compile().as_text())
    by_scope = {}
    for info in found.values():
        for scope in ("mlp/up", "attn/scores"):
            if scope in info["op_name"]:
                by_scope[scope] = by_scope.get(scope, 0) + info["flops"]
    assert by_scope == {"mlp/up": 2 * 64 * 48 * 80, "attn/scores": 2 * 6 * 16 * 24 * 8}
    assert sum(i["flops"] for i in found.values()) == 2 * 64 * 48 * 80 + 2 * 6 * 16 * 24 * 8


def test_an_instruction_left_unnamed_takes_its_operands_name():
    hlo = """HloModule m

ENTRY %main (p: f32[4,4]) -> f32[4,1] {
  %p = f32[4,4]{1,0} parameter(0)
  %ones = f32[4,1]{1,0} constant({ {1}, {1}, {1}, {1} })
  %e = f32[4,4]{1,0} exponential(%p), metadata={op_name="jit(step)/jvp()/exp"}
  ROOT %d = f32[4,1]{1,0} dot(%e, %ones), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    found = cpu_profile.hlo_instructions(hlo)
    assert found["d"] == {"op_name": "jit(step)/jvp()/exp", "library_dot": True, "flops": 2 * 4 * 1 * 4}
    assert found["p"]["op_name"] == "" and cpu_profile.part_of(found["d"]["op_name"], is_product=True) == "loss"


@pytest.mark.parametrize("op_name, part", [
    ("jit(step)/jvp(DecoderLM)/blocks/layers_3/mlp/up/dot_general", "mlp"),
    ("jit(step)/transpose(jvp(DecoderLM))/blocks/layers_0/attn/query/dot_general", "attention projections"),
    ("jit(step)/transpose(jvp(EncoderDecoder))/decoder/layers_1/cross_attn/out/dot_general", "attention projections"),
    ("jit(step)/jvp(DecoderLM)/blocks/layers_5/attn/bkgqd,bksd->bkgqs/dot_general", "attention"),
    ("jit(step)/jvp(DecoderLM)/blocks/layers_5/attn_norm/reduce_sum", "norms"),
    ("jit(step)/transpose(jvp(EncoderMLM))/final_norm/mul", "norms"),
    ("jit(step)/jvp(DecoderLM)/dot_general", "other model products"),
    ("jit(step)/transpose(jvp())/sub", "loss"),
    ("jit(step)/add", "optimizer and the rest"),
])
def test_each_instruction_is_given_to_its_part_of_the_model(op_name, part):
    assert cpu_profile.part_of(op_name, is_product="dot_general" in op_name) == part


def test_wall_time_is_shared_among_kernels_running_together_and_products_run_to_their_end():
    names = {"a": "jit(step)/jvp(M)/blocks/mlp/up/dot_general",
             "b": "jit(step)/transpose(jvp(M))/blocks/attn/query/dot_general",
             "c": "jit(step)/add"}
    instructions = {"a": {"op_name": names["a"], "library_dot": False, "flops": 6_000_000},
                    "b": {"op_name": names["b"], "library_dot": True, "flops": 2_000_000},
                    "c": {"op_name": names["c"], "library_dot": False, "flops": 0}}

    def ev(name, ts, dur):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur}

    # One step (microseconds): a runs 0-60; b (a library product) is issued at 20 and its
    # end is marked at 80; nothing runs 80-90; c runs 90-100.
    events = [ev("a", 0, 60), ev("b", 20, 1), ev("ThreadpoolListener::Record", 30, 1), ev("end: b", 79, 1),
              ev("c", 90, 10)]
    parts = cpu_profile.attribute(events, instructions, steps=1)
    ms = {name: round(p["ms"] * 1e3, 6) for name, p in parts.items() if p["ms"]}  # microseconds
    assert ms == {"mlp": 20 + 40 / 2, "attention projections": 40 / 2 + 20, "idle": 10,
                  "optimizer and the rest": 10}
    assert parts["attention projections"]["backward_ms"] == parts["attention projections"]["ms"]
    assert parts["mlp"]["forward_ms"] == parts["mlp"]["ms"]
    assert parts["mlp"]["gflop"] == 0.006
