"""Training through the real entry point: mesh equivalence, exact resume, accumulation, NaNs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from t2x.checkpoint import Checkpointer
from t2x.components import build
from t2x.objectives import causal_lm
from t2x.parallel import sharding_context
from t2x.train.loop import NonFiniteError, train
from t2x.train.state import TrainState, init_state, make_optimizer, state_shardings
from t2x.train.step import make_train_step


def train_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train" and "loss" in r}


MESHES = {
    "data8": (["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"], None),
    "fsdp8": (["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"], None),
    "mixed222": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], None),
    "one_device": (["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"], 1),
}


def test_losses_agree_across_meshes(tmp_path):
    losses = {}
    for name, (mesh, num_devices) in MESHES.items():
        cfg = tiny_config(tmp_path / name, "train.steps=5", "checkpoint.every=5", *mesh)
        devices = jax.devices()[:num_devices] if num_devices else None
        train(cfg, devices=devices)
        losses[name] = np.array([train_losses(tmp_path / name)[s] for s in range(1, 6)])
    assert losses["data8"][-1] < losses["data8"][0]
    for name, values in losses.items():
        np.testing.assert_allclose(values, losses["one_device"], rtol=2e-5, err_msg=name)


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    common = ["optim.decay_steps=6", "checkpoint.every=3", "model.dropout=0.1"]
    train(tiny_config(tmp_path / "straight", "train.steps=6", *common))
    train(tiny_config(tmp_path / "resumed", "train.steps=3", *common))
    train(tiny_config(tmp_path / "resumed", "train.steps=6", *common))
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    assert [straight[s] for s in range(1, 7)] == [resumed[s] for s in range(1, 7)]
    a = Checkpointer(tmp_path / "straight" / "checkpoints", read_only=True)
    b = Checkpointer(tmp_path / "resumed" / "checkpoints", read_only=True)
    assert a.all_steps() == b.all_steps() == [3, 6]


def _one_step(cfg, batch):
    c = build(cfg)
    tx, schedule = make_optimizer(cfg)
    with sharding_context(c.mesh):
        _, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        state = init_state(c.model, tx, shardings, cfg.train.seed, cfg.data.seq_len)
        step = jax.jit(make_train_step(c.model, tx, schedule, cfg, c.tokenizer.bos_id))
        new_state, metrics = step(state, batch)
    return c, state, new_state, jax.device_get(metrics)


def _batch(seed=0, batch=8, seq=32):
    rng = np.random.default_rng(seed)
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[:, seq // 2:] = 2
    segment_ids[0, -5:] = 0  # some padding
    positions = np.concatenate([np.arange(seq // 2)] * 2)[None].repeat(batch, 0).astype(np.int32)
    return {
        "tokens": jnp.asarray(rng.integers(4, 512, (batch, seq)), jnp.int32),
        "segment_ids": jnp.asarray(segment_ids),
        "positions": jnp.asarray(positions),
        "num_bytes": jnp.zeros((batch,), jnp.int32),
    }


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, optimizer):
    batch = _batch()
    _, _, whole, m1 = _one_step(tiny_config(tmp_path, f"optim.name={optimizer}", "mesh.data=-1"), batch)
    _, _, accumulated, m4 = _one_step(
        tiny_config(tmp_path, f"optim.name={optimizer}", "train.grad_accum_steps=4", "mesh.data=2", "mesh.tensor=4"), batch
    )
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    # Parameters whose true gradient is zero (key biases) move by float noise that Adam's
    # first step normalizes: compare against a tolerance far below the learning rate.
    for x, y in zip(jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert int(accumulated.step) == 1


def test_z_loss_metric_and_gradient(tmp_path):
    batch = _batch(seed=1)
    c, state, _, metrics = _one_step(tiny_config(tmp_path, "train.z_loss=0.01"), batch)
    example = causal_lm(batch, c.tokenizer.bos_id)
    with sharding_context(c.mesh):
        logits = c.model.apply({"params": state.params}, example["inputs"], example["positions"], example["segment_ids"])
    log_z = np.asarray(jax.nn.logsumexp(logits, -1), np.float64)
    weights = np.asarray(example["weights"])
    np.testing.assert_allclose(metrics["z_loss"], (log_z**2 * weights).sum() / weights.sum(), rtol=1e-5)
    _, _, without, _ = _one_step(tiny_config(tmp_path), batch)
    _, _, with_z, _ = _one_step(tiny_config(tmp_path, "train.z_loss=0.01"), batch)
    assert not np.allclose(without.params["final_norm"]["scale"], with_z.params["final_norm"]["scale"])


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_weight_decay_is_decoupled_scaled_by_lr_and_spares_norms_and_biases(tmp_path, optimizer):
    cfg = tiny_config(tmp_path, f"optim.name={optimizer}", "optim.weight_decay=0.5", "optim.lr=0.1",
                      "optim.warmup_steps=0", "optim.decay=constant", "optim.clip_norm=null")
    batch = {k: jnp.zeros_like(v) for k, v in _batch().items()}  # all padding: zero gradients
    _, before, after, _ = _one_step(cfg, batch)
    assert np.allclose(after.params["final_norm"]["scale"], before.params["final_norm"]["scale"])
    assert np.allclose(after.params["blocks"]["layers"]["mlp"]["up"]["bias"],
                       before.params["blocks"]["layers"]["mlp"]["up"]["bias"])
    kernel = before.params["blocks"]["layers"]["mlp"]["up"]["kernel"]
    # p <- p - lr * wd * p: shrunk by 1 - 0.1 * 0.5, not by 1 - 0.5.
    np.testing.assert_allclose(after.params["blocks"]["layers"]["mlp"]["up"]["kernel"], kernel * 0.95, rtol=1e-5)


def test_nonfinite_loss_stops_the_run_and_never_checkpoints_it(tmp_path):
    cfg = tiny_config(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=null",
                      "checkpoint.every=1", "train.steps=6")
    with pytest.raises(NonFiniteError, match="step 2"):
        train(cfg)
    checkpoints = Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert checkpoints.all_steps() == [1]


def test_nonfinite_updates_are_skipped_when_asked(tmp_path):
    cfg = tiny_config(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=null",
                      "train.on_nonfinite=skip", "train.steps=4")
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if r["split"] == "train" and "skipped_steps" in r]
    assert [r["skipped_steps"] for r in logged] == [0, 1, 2, 3]  # steps 2-4 see step 1's overflowed parameters
    assert logged[0]["loss"] > 0 and [r["loss"] for r in logged[1:]] == [None, None, None]
    # The schedule does not advance on skipped updates: steps 2-4 all use the rate of the second update.
    assert logged[0]["learning_rate"] > logged[1]["learning_rate"] == logged[2]["learning_rate"] == logged[3]["learning_rate"]
    c = build(cfg)
    with sharding_context(c.mesh):
        tx, _ = make_optimizer(cfg)
        abstract, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        state, _ = Checkpointer(tmp_path / "checkpoints", read_only=True).restore(None, abstract, shardings)
    assert isinstance(state, TrainState) and int(state.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("decay, final", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0), ("rsqrt", 0.2)])
def test_learning_rate_schedules(decay, final):
    from t2x.config import OptimConfig
    from t2x.train.state import make_schedule

    schedule = make_schedule(OptimConfig(lr=1.0, warmup_steps=4, decay=decay, min_lr_ratio=0.1), total_steps=100)
    assert [float(schedule(s)) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert float(schedule(4)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(final)  # rsqrt: sqrt(warmup / step)
    assert float(schedule(50)) <= 1.0


def test_metrics_report_what_the_pipeline_read_and_repaired(tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = [f"document number {i} talks about parsing values".encode() for i in range(40)]
    lines[5] = b"bad bytes \xff\xfe here"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    cfg = tiny_config(tmp_path / "run", "data.source=files", f"data.train_files=[{corpus}]",
                      f"data.eval_files=[{corpus}]", "data.num_shards=2", "eval.max_batches=null")
    result = train(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train" and "documents" in r]
    assert train_records[-1]["invalid_utf8"] >= 1 and train_records[-1]["documents"] >= 40
    assert result["documents"] == 40 and result["invalid_utf8"] == 1 and result["bad_records"] == 0


def test_resume_with_other_data_settings_is_refused_and_keeps_the_run(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2"))
    recorded = (tmp_path / "config.yaml").read_text()
    from t2x.config import ConfigError

    with pytest.raises(ConfigError, match="data.num_shards"):
        train(tiny_config(tmp_path, "train.steps=4", "data.num_shards=4"))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        train(tiny_config(tmp_path, "train.steps=4", "data.tokenizer=builtin:384"))
    with pytest.raises(ConfigError, match="train.seed"):
        train(tiny_config(tmp_path, "train.steps=4", "train.seed=1"))
    assert (tmp_path / "config.yaml").read_text() == recorded
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [2]


def test_capped_eval_over_long_documents_reports_no_bits_per_byte(tmp_path):
    corpus = tmp_path / "long.txt"
    corpus.write_text("\n".join(" ".join(f"word{i}{j}" for j in range(400)) for i in range(6)) + "\n")
    cfg = tiny_config(tmp_path / "run", "data.source=files", f"data.train_files=[{corpus}]",
                      f"data.eval_files=[{corpus}]", "data.num_shards=2", "eval.max_batches=1", "train.steps=2")
    result = train(cfg)
    assert result["bits_per_byte"] is None and result["bytes"] == 0 and result["tokens"] > 0
