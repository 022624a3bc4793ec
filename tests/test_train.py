"""Training through the real entry point: mesh equivalence, exact resume, accumulation, NaNs."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from conftest import restored, tiny_config
from t2x.checkpoint import CheckpointError, Checkpointer
from t2x.components import build
from t2x.families import family
from t2x.objectives import causal_lm, token_losses
from t2x.parallel import sharding_context
from t2x.train.loop import NonFiniteError, train
from t2x.train.metrics import to_json
from t2x.train.state import TrainState, base_opt_state, init_state, make_optimizer, state_shardings
from t2x.train.step import make_objective, make_train_step


def train_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train" and "loss" in r}


MESHES = {
    "data8": (["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"], None),
    "fsdp8": (["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"], None),
    "mixed222": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], None),
    "one_device": (["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"], 1),
}


def train_on_every_mesh(make, tmp_path, steps: int, *overrides) -> tuple[dict, dict]:
    """Train ``make(tmp_path / mesh name, ...)`` on each of ``MESHES``; each mesh's train
    losses of steps 1..``steps`` and its final evaluation, after checking that the losses
    agree with one device's."""
    losses, evals = {}, {}
    for name, (mesh, num_devices) in MESHES.items():
        devices = jax.devices()[:num_devices] if num_devices else None
        evals[name] = train(make(tmp_path / name, f"train.steps={steps}", *overrides, *mesh), devices=devices)
        losses[name] = np.array([train_losses(tmp_path / name)[s] for s in range(1, steps + 1)])
    for name, values in losses.items():
        np.testing.assert_allclose(values, losses["one_device"], rtol=2e-5, err_msg=name)
    return losses, evals


def test_losses_agree_across_meshes(tmp_path):
    # The tiny run's own settings: programs other tests compile too.
    losses, _ = train_on_every_mesh(tiny_config, tmp_path, 4)
    assert losses["data8"][-1] < losses["data8"][0]


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


def _one_step(cfg, batch, devices=None):
    c = build(cfg, devices=devices)
    tx, schedule = make_optimizer(cfg)
    with sharding_context(c.mesh):
        _, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        state = init_state(c.model, tx, shardings, cfg.train.seed, cfg.data.seq_len)
        step = jax.jit(make_train_step(c.model, tx, schedule, cfg, family(cfg.model.family).objective(cfg, c.tokenizer)))
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


def test_bfloat16_steps_agree_across_meshes(tmp_path):
    """A bfloat16 step (on a CPU, its dense products computed in float32 and rounded, their
    operands transposed and reshaped for the matrix library) gives one batch the same loss
    and gradient norm on one device as sharded over data, fsdp and tensor."""
    batch = _batch(seed=3)
    one = _one_step(tiny_config(tmp_path, "model.dtype=bfloat16", "mesh.data=1"), batch, jax.devices()[:1])
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    mixed = _one_step(tiny_config(tmp_path, "model.dtype=bfloat16", *mesh), batch)
    np.testing.assert_allclose(one[3]["loss"], mixed[3]["loss"], rtol=1e-5)
    np.testing.assert_allclose(one[3]["grad_norm"], mixed[3]["grad_norm"], rtol=2e-3)


def test_token_losses_and_their_written_out_gradient_match_float64_and_scatter_nothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 37)) * 4
    logits[1] *= 100  # far beyond exp's float32 range without the max subtracted
    logits[2, 0, 10:] = -np.inf  # a row with ids masked out
    targets = rng.integers(0, 10, size=(3, 5))
    g_nll, g_log_z = rng.normal(size=(2, 3, 5))
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    probs = np.exp(logits - log_z[..., None])
    expected = probs * (g_nll + g_log_z)[..., None] - np.eye(37)[targets] * g_nll[..., None]

    def pulled(x):
        out, vjp = jax.vjp(lambda x: token_losses(x, jnp.asarray(targets)), x)
        return out, vjp((jnp.asarray(g_nll, jnp.float32), jnp.asarray(g_log_z, jnp.float32)))[0]

    (got_nll, got_log_z), grad = pulled(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(got_nll, nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_log_z, log_z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    # bfloat16 logits: computed in float32, the gradient returned in bfloat16
    (_, _), grad16 = pulled(jnp.asarray(logits, jnp.bfloat16))
    assert grad16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad16, np.float32), expected, atol=0.05)
    hlo = jax.jit(lambda x: pulled(x)[1]).lower(jnp.asarray(logits, jnp.float32)).compile().as_text()
    assert not re.search(r"\bscatter\(", hlo)  # the target's gradient is a select in the softmax's pass, not a scatter-add


def test_z_loss_metric_and_gradient_match_a_float64_reference(tmp_path):
    batch = _batch(seed=1)
    c, state, _, metrics = _one_step(tiny_config(tmp_path, "train.z_loss=0.5"), batch)
    example = causal_lm(batch, c.tokenizer.bos_id)
    ex = {k: np.asarray(v) for k, v in {**example["model"], **example}.items() if k != "model"}
    weights = ex["weights"]

    def objective64(params):  # mean NLL + 0.5 x mean log(Z)^2, in float64 NumPy
        logits = reference.forward(params, c.cfg.model, ex["tokens"], ex["positions"], ex["segment_ids"])
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = log_z - np.take_along_axis(logits, ex["targets"][..., None], -1)[..., 0]
        return ((nll + 0.5 * log_z**2) * weights).sum() / weights.sum(), (log_z**2 * weights).sum() / weights.sum()

    params = jax.device_get(state.params)
    assert metrics["z_loss"] == pytest.approx(objective64(params)[1], rel=1e-5)
    objective = make_objective(c.model, c.cfg)
    with sharding_context(c.mesh):
        grads = jax.grad(lambda p: objective(p, example, jnp.sum(example["weights"]), jax.random.key(0))[0])(state.params)
    # The directional derivative along a random direction, by central differences in float64.
    rng = np.random.default_rng(2)
    direction = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
    eps = 1e-5
    shifted = [objective64(jax.tree.map(lambda p, d: p + sign * eps * d, params, direction))[0] for sign in (1, -1)]
    numeric = (shifted[0] - shifted[1]) / (2 * eps)
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert analytic == pytest.approx(numeric, rel=2e-4)


def test_label_smoothing_matches_a_float64_reference_and_keeps_the_reported_loss(tmp_path):
    batch = _batch(seed=1)
    c, state, _, metrics = _one_step(tiny_config(tmp_path, "train.label_smoothing=0.1"), batch)
    example = causal_lm(batch, c.tokenizer.bos_id)
    ex = {k: np.asarray(v) for k, v in {**example["model"], **example}.items() if k != "model"}
    params = jax.device_get(state.params)
    logits = reference.forward(params, c.cfg.model, ex["tokens"], ex["positions"], ex["segment_ids"])
    log_p = logits - (np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) + logits.max(-1, keepdims=True))
    target = np.full(logits.shape, 0.1 / logits.shape[-1])  # the smoothed target distribution
    np.put_along_axis(target, ex["targets"][..., None], 0.9 + 0.1 / logits.shape[-1], -1)
    w = ex["weights"]
    smoothed = (-(target * log_p).sum(-1) * w).sum() / w.sum()
    nll = (-np.take_along_axis(log_p, ex["targets"][..., None], -1)[..., 0] * w).sum() / w.sum()
    with sharding_context(c.mesh):
        value, (nll_sum, _, _) = make_objective(c.model, c.cfg)(state.params, example, jnp.sum(example["weights"]),
                                                                 jax.random.key(0))
    assert float(value) == pytest.approx(smoothed, rel=1e-5) and float(nll_sum) / w.sum() == pytest.approx(nll, rel=1e-5)
    assert abs(smoothed - nll) > 1e-3  # the smoothing is not lost in the tolerance


def test_adafactor_steps_are_per_layer_whether_layers_are_scanned_or_not(tmp_path):
    """Update clipping and parameter-scaled steps look at one layer, not the whole stack."""
    cfg = tiny_config(tmp_path, "optim.name=adafactor", "optim.clip_norm=null", "optim.warmup_steps=0")
    tx, _ = make_optimizer(cfg)
    rng = np.random.default_rng(0)
    layers = 3
    stacked = {"blocks": {"layers": {"kernel": rng.normal(size=(layers, 128, 256)).astype(np.float32),
                                     "bias": rng.normal(size=(layers, 256)).astype(np.float32)}},
               "embed": {"embedding": rng.normal(size=(300, 128)).astype(np.float32)}}
    stacked["blocks"]["layers"]["kernel"][0] *= 0.01  # one layer at a much smaller scale
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), stacked)

    def unrolled(tree):
        blocks = {f"layers_{i}": jax.tree.map(lambda x: x[i], tree["blocks"]["layers"]) for i in range(layers)}
        return {"blocks": blocks, "embed": tree["embed"]}

    scanned_update, _ = tx.update(grads, tx.init(stacked), stacked)
    unrolled_update, _ = tx.update(unrolled(grads), tx.init(unrolled(stacked)), unrolled(stacked))
    for a, b in zip(jax.tree.leaves(unrolled(scanned_update)), jax.tree.leaves(unrolled_update)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    # Steps are relative to each layer's own scale: the small layer's are 100x smaller.
    rms = [np.sqrt(np.mean(np.asarray(scanned_update["blocks"]["layers"]["kernel"][i]) ** 2)) for i in range(2)]
    assert rms[0] / rms[1] == pytest.approx(0.01, rel=0.1)


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
    with pytest.raises(NonFiniteError, match="step 2.*the newest checkpoint, step 1, is untouched"):
        train(cfg)
    checkpoints = Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert checkpoints.all_steps() == [1]


def test_a_diverged_last_checkpoint_does_not_push_out_the_good_ones(tmp_path):
    common = ["checkpoint.every=1", "checkpoint.keep=2", "optim.warmup_steps=0", "optim.clip_norm=null",
              "optim.decay=constant"]
    train(tiny_config(tmp_path, "train.steps=6", *common))
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [5, 6]
    # Resumed with an absurd learning rate: step 7 leaves huge but finite parameters (and
    # is saved); step 8 is non-finite.
    with pytest.raises(NonFiniteError, match=r"step 8.*newest checkpoint, step 7.*step 6 is the last good one"):
        train(tiny_config(tmp_path, "train.steps=10", "optim.lr=1e30", *common))
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [5, 6, 7]


def test_nonfinite_updates_are_skipped_when_asked(tmp_path, caplog):
    cfg = tiny_config(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=null",
                      "train.on_nonfinite=skip", "train.steps=4")
    result = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if r["split"] == "train" and "skipped_steps" in r]
    assert [r["skipped_steps"] for r in logged] == [0, 1, 2, 3]  # steps 2-4 see step 1's overflowed parameters
    assert logged[0]["loss"] > 0 and [r["loss"] for r in logged[1:]] == [None, None, None]
    # The schedule does not advance on skipped updates: steps 2-4 all use the rate of the second update.
    assert logged[0]["learning_rate"] > logged[1]["learning_rate"] == logged[2]["learning_rate"] == logged[3]["learning_rate"]
    assert [m for m in caplog.messages if "update was skipped" in m] == [
        m for m in caplog.messages if "non-finite values at step" in m] and len(
        [m for m in caplog.messages if "update was skipped" in m]) == 3
    state, _ = restored(tmp_path, "train.on_nonfinite=skip")
    assert isinstance(state, TrainState) and int(state.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    # The evaluation of those huge parameters is not a number; its JSON says null, strictly.
    strict = json.loads(to_json(result), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert result["loss"] != result["loss"] and strict["loss"] is None and strict["step"] == 4
    with pytest.raises(NonFiniteError, match="3 updates in a row were skipped, up to step 7"):
        train(tiny_config(tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=null",
                          "train.on_nonfinite=skip", "train.steps=10", "train.max_consecutive_skips=3"))


def test_optimizer_wrapper_settings_may_change_on_resume(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2", "checkpoint.every=2"))
    saved, _ = restored(tmp_path)
    changed = ["train.grad_accum_steps=2", "train.on_nonfinite=skip", "optim.clip_norm=null", "mesh.data=4", "mesh.tensor=2"]
    carried, _ = restored(tmp_path, *changed)
    old_cfg, new_cfg = tiny_config(tmp_path), tiny_config(tmp_path, *changed)
    for a, b in zip(jax.tree.leaves(base_opt_state(saved.opt_state, old_cfg)),
                    jax.tree.leaves(base_opt_state(carried.opt_state, new_cfg))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(carried.opt_state.mini_step) == 0 and int(carried.opt_state.inner_opt_state.total_notfinite) == 0
    assert train(tiny_config(tmp_path, "train.steps=3", *changed))["step"] == 3
    with pytest.raises(CheckpointError, match="optim.name=adamw"):
        restored(tmp_path, "optim.name=adafactor")


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


def test_dropout_rng_implementations_draw_their_own_masks_and_the_same_again(tmp_path):
    batch = _batch(seed=4)
    losses = {}
    for impl in ("threefry2x32", "rbg", "rbg"):
        *_, metrics = _one_step(tiny_config(tmp_path, "model.dropout=0.3", f"train.dropout_rng={impl}"), batch)
        assert np.isfinite(metrics["loss"])
        losses.setdefault(impl, []).append(float(metrics["loss"]))
    *_, plain = _one_step(tiny_config(tmp_path, "model.dropout=0.0"), batch)
    assert losses["rbg"][0] == losses["rbg"][1]  # the same seed and step, the same masks
    assert len({losses["threefry2x32"][0], losses["rbg"][0], float(plain["loss"])}) == 3
