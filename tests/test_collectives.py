"""The collectives a compiled train step runs, read from its HLO on 8 virtual CPU devices,
against the mesh's formula (``t2x.parallel.collectives``); CPU steps with no loop holding
collectives (``scan_unroll``); and CPU programs with collectives kept out of JAX's
compilation cache (``keep_cpu_collectives_in_order``)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import GPT2_LAYERS, REPO
from t2x.bench import StepBench
from t2x.config import load_config
from t2x.parallel.collectives import (Collective, by_group, collectives, predicted_payloads, unordered_collectives,
                                     wire_bytes)
from t2x.components import warn_of_cpu_loops

MODULE = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %ar = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %ag = f32[64]{0} all-gather(f32[8]{0} %y), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %w = (s32[], f32[8,4]{1,0}) while((s32[], f32[8,4]{1,0}) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = bf16[2,16]{1,0} reduce-scatter(bf16[16,16]{1,0} %z), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=8] {'axis_1'}, dimensions={0}
  %t2 = (f32[4]{0}, f32[2,2]{1,0}) all-reduce(f32[4]{0} %u, f32[2,2]{1,0} %v), channel_id=4, replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, to_apply=%add
}
"""


def test_collectives_are_read_with_their_bytes_groups_and_loop_trips():
    found = collectives(MODULE)
    assert sorted(found, key=repr) == sorted([
        *[Collective("all-reduce", 8 * 4 * 4, 4)] * 3,  # in a loop of 3 trips; groups of 4
        *[Collective("all-gather", 64 * 4, 8)] * 3,
        Collective("reduce-scatter", 16 * 16 * 2, 8),  # the operand; the result is one member's share
        Collective("all-reduce", 4 * 4 + 4 * 4, 4),  # a tuple; the groups named by mesh axes
    ], key=repr)
    # the reduce-scatter and the tuple all-reduce do not wait for the loop holding collectives
    assert unordered_collectives(MODULE) == [("w", "rs"), ("w", "t2")]
    waiting = MODULE.replace("bf16[16,16]{1,0} %z", "bf16[16,16]{1,0} %w").replace("f32[4]{0} %u", "f32[4]{0} %rs")
    assert unordered_collectives(waiting) == []
    quiet_body = [line for line in MODULE.splitlines() if "channel_id=1," not in line and "channel_id=2," not in line]
    assert unordered_collectives("\n".join(quiet_body)) == []
    assert wire_bytes(Collective("all-reduce", 800, 4)) == 2 * 3 / 4 * 800
    assert wire_bytes(Collective("all-gather", 800, 8)) == 7 / 8 * 800


def measured(*mesh):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*GPT2_LAYERS, *mesh, "data.num_shards=8"])
    b = StepBench(cfg, batches=1)
    by: dict[tuple[str, int], int] = {}
    for c in collectives(b.compiled.as_text()):
        by[c.kind, c.group_size] = by.get((c.kind, c.group_size), 0) + c.payload_bytes
    specs = jax.tree.map(lambda x: x.sharding.spec, b.state.params)
    predicted = by_group(predicted_payloads(b.state.params, specs, dict(b.mesh.shape), cfg.model,
                                            cfg.train.global_batch_size, cfg.data.seq_len), dict(b.mesh.shape))
    params = sum(x.size for x in jax.tree.leaves(b.state.params))
    return cfg, by, predicted, params


SCALARS = 1024  # the step's metrics (loss and weight sums, the gradient norm) are all-reduced too


def test_data_parallel_all_reduces_each_gradient_once_and_the_tied_table_twice():
    cfg, by, predicted, params = measured("mesh.data=8")
    table = cfg.model.vocab_size * cfg.model.d_model * 4
    assert set(by) == {("all-reduce", 8)}
    assert predicted == {"all-reduce": {8: 4 * params + table}}
    assert 4 * params + table <= by["all-reduce", 8] <= 4 * params + table + SCALARS


def test_fsdp_gathers_each_parameter_once_and_reduces_each_gradient_once():
    cfg, by, predicted, params = measured("mesh.data=1", "mesh.fsdp=8")
    gathered = predicted["all-gather"][8]
    # every parameter but the norms' (not split) is gathered, once
    assert 0.95 * 4 * params <= gathered <= 4 * params
    assert gathered <= by["all-gather", 8] <= gathered + 64 * 1024
    # gradients: reduce-scattered, or (XLA on a CPU) all-reduced whole, once each
    reduced = by.get(("all-reduce", 8), 0) + by.get(("reduce-scatter", 8), 0)
    table = cfg.model.vocab_size * cfg.model.d_model * 4
    assert 4 * params <= reduced <= 4 * params + table + SCALARS
    # activations stay where they are: at most one activation's worth is resharded
    activation = cfg.train.global_batch_size * cfg.data.seq_len * cfg.model.d_model * 4
    assert by.get(("all-to-all", 8), 0) <= activation
    assert not {k for k in by if k[1] != 8}


def test_tensor_parallel_all_reduces_six_activations_a_layer_and_two_more():
    cfg, by, predicted, params = measured("mesh.data=2", "mesh.tensor=4")
    rows = cfg.train.global_batch_size // 2
    activation = rows * cfg.data.seq_len * cfg.model.d_model * 4
    assert predicted["all-reduce"][4] == (6 * cfg.model.num_layers + 2) * activation
    per_token = 8 * rows * cfg.data.seq_len * 4  # the vocabulary-split cross-entropy's per-token max, sum, ...
    assert predicted["all-reduce"][4] <= by["all-reduce", 4] <= predicted["all-reduce"][4] + per_token + SCALARS
    assert predicted["all-reduce"][2] <= by["all-reduce", 2] <= predicted["all-reduce"][2] + SCALARS
    assert set(by) == {("all-reduce", 4), ("all-reduce", 2)}


@pytest.mark.parametrize("mesh", [("mesh.data=8",), ("mesh.data=1", "mesh.fsdp=8"), ("mesh.data=2", "mesh.tensor=4")])
def test_activation_constraints_reach_the_compiled_step(mesh):
    """Flax applies the model's logical constraints only with a mesh set in context: the
    compiled step then keeps every device's activations to its own rows."""
    cfg, by, _, _ = measured(*mesh)
    full_logits = cfg.train.global_batch_size * cfg.data.seq_len * cfg.model.vocab_size * 4
    assert all(v < full_logits for v in by.values())


_SHARDED_SUM = """
import json, os, pathlib
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from t2x.config import MeshConfig
from t2x.parallel import make_mesh

mesh = make_mesh(MeshConfig(data=-1))
x = jax.device_put(jnp.arange(64.0), NamedSharding(mesh, P("data")))
total = jax.jit(lambda v: jnp.sum(v * v), out_shardings=NamedSharding(mesh, P()))(x)
cache = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
print(json.dumps({"total": float(total), "entries": len(list(cache.glob("*"))) if cache.exists() else 0,
                  "cache_on": jax.config.jax_enable_compilation_cache}))
"""


@pytest.mark.parametrize("devices", [1, 8])
def test_cpu_programs_with_collectives_are_never_read_back_from_the_compilation_cache(tmp_path, devices):
    # XLA:CPU's cached form of a program loses the order of its collectives (see
    # keep_cpu_collectives_in_order): with several CPU devices, nothing is written or read.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}
    out = subprocess.run([sys.executable, "-c", _SHARDED_SUM], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["total"] == sum(i * i for i in range(64))
    if devices == 1:
        assert result["cache_on"] and result["entries"] > 0
    else:
        assert not result["cache_on"] and result["entries"] == 0


def test_a_cpu_step_over_several_devices_runs_its_collectives_in_order(tmp_path, caplog):
    """XLA:CPU starts what follows a loop holding collectives once the loop has started, so
    devices can meet in different collectives (two-process T5 jobs aborted in gloo in 8 of
    30 runs on the layers' loop). On a CPU the scanned stacks are unrolled by default
    (``scan_unroll``), the parameters still stacked; a loop asked for is kept, with a
    warning."""
    from test_seq2seq import seq2seq_config

    mesh = ["mesh.data=2", "mesh.fsdp=4", "data.num_shards=8"]
    default = StepBench(seq2seq_config(tmp_path, *mesh), batches=1)
    assert default.cfg.model.scan_layers and default.cfg.model.scan_unroll is None
    assert unordered_collectives(default.compiled.as_text()) == []
    assert "leaves the layers in a loop" not in caplog.text
    looped = StepBench(seq2seq_config(tmp_path, *mesh, "model.scan_unroll=1"), batches=1)
    assert unordered_collectives(looped.compiled.as_text())  # the decoder's embedding lookup, after the encoder's loop
    assert jax.tree.structure(looped.state.params) == jax.tree.structure(default.state.params)
    assert "model.scan_unroll=1 leaves the layers in a loop" in caplog.text  # build's warning
    caplog.clear()
    warn_of_cpu_loops(looped.cfg.model, 1)  # one device: no collectives
    assert not caplog.records
