"""The loss computed a chunk of positions at a time (``train.loss_chunk_len``): the same
values and gradients as the whole logits', without holding them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from t2x.bench import StepBench
from t2x.components import build
from t2x.evaluate import make_eval_step
from t2x.models.layers import VocabLogits
from t2x.objectives import chunked_lm_loss, token_losses, token_predictions
from t2x.config import MeshConfig
from t2x.parallel import make_mesh, sharding_context
from test_encoder import encoder_config
from test_seq2seq import seq2seq_config


@pytest.mark.parametrize("vocab_axis", [0, 1])
def test_chunked_lm_loss_matches_float64_and_autodiff_of_the_whole_logits(vocab_axis):
    rng = np.random.default_rng(3)
    batch, seq, width, vocab, z_coef, smoothing = 3, 10, 16, 37, 0.3, 0.1
    hidden = rng.normal(size=(batch, seq, width))
    table = rng.normal(size=(vocab, width)) * 2  # logits far from uniform
    bias = rng.normal(size=vocab)
    targets = rng.integers(0, vocab, size=(batch, seq))
    weights = (rng.random((batch, seq)) < 0.7).astype(np.float64)
    scale = 1 / weights.sum()
    logits = hidden @ table.T + bias  # float64
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    per_token = (1 - smoothing) * nll + smoothing * (log_z - logits.mean(-1)) + z_coef * log_z**2
    weight = table if vocab_axis == 0 else table.T

    def chunked(h, w, b, chunk_len):
        projection = VocabLogits(h, w, b, vocab_axis=vocab_axis)
        return chunked_lm_loss(projection, jnp.asarray(targets), jnp.asarray(weights, jnp.float32), scale,
                               chunk_len=chunk_len, z_loss=z_coef, label_smoothing=smoothing)

    def whole(h, w, b):  # the loss written plainly, for autodiff
        lg = VocabLogits(h, w, b, vocab_axis=vocab_axis).logits()
        log_p = jax.nn.log_softmax(lg)
        lz = jax.nn.logsumexp(lg, -1)
        token = (-(1 - smoothing) * jnp.take_along_axis(log_p, jnp.asarray(targets)[..., None], -1)[..., 0]
                 - smoothing * jnp.mean(log_p, -1) + z_coef * lz**2)
        return jnp.sum(token * weights) * scale

    args = [jnp.asarray(x, jnp.float32) for x in (hidden, weight, bias)]
    expected = jax.grad(whole, argnums=(0, 1, 2))(*args)
    for chunk_len in (3, 4, 10, 32):  # 3 and 4: 4 chunks of 3, 3 of 4, the last padded; 32: one of 10
        (value, nll_sum, z_sum), vjp = jax.vjp(lambda h, w, b: chunked(h, w, b, chunk_len), *args)
        assert float(value) == pytest.approx((per_token * weights).sum() * scale, rel=1e-5)
        assert float(nll_sum) == pytest.approx((nll * weights).sum(), rel=1e-5)
        assert float(z_sum) == pytest.approx((log_z**2 * weights).sum(), rel=1e-5)
        grads = vjp((jnp.float32(2.0), jnp.float32(0), jnp.float32(0)))
        for got, want in zip(grads, expected):
            np.testing.assert_allclose(got, 2 * np.asarray(want), rtol=1e-4, atol=1e-6)
    # bfloat16 states and projection: float32 logits and sums, gradients in bfloat16 and
    # as the whole logits' (float32_dot_general: its backward products in bfloat16)
    args16 = (args[0].astype(jnp.bfloat16), args[1].astype(jnp.bfloat16), args[2])
    (value16, _, _), vjp16 = jax.vjp(lambda h, w, b: chunked(h, w, b, 4), *args16)
    grads16 = vjp16((jnp.float32(1.0), jnp.float32(0), jnp.float32(0)))
    expected16 = jax.grad(whole, argnums=(0, 1, 2))(*args16)
    assert value16.dtype == jnp.float32 and grads16[0].dtype == grads16[1].dtype == jnp.bfloat16
    assert float(value16) == pytest.approx(float(whole(*args16)), rel=1e-5)
    for got, want in zip(grads16, expected16):
        assert got.dtype == want.dtype
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    # on a mesh that does not divide the batch (3 rows, 4 batch shards): summed over all rows, the same
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
    with sharding_context(mesh):
        got = jax.jit(jax.grad(lambda h, w, b: chunked(h, w, b, 4)[0], argnums=(0, 1, 2)))(*args)
    for g, want in zip(got, expected):
        np.testing.assert_allclose(g, np.asarray(want), rtol=1e-4, atol=1e-6)


def test_rows_go_in_as_few_chunks_as_the_length_allows_all_of_one_length():
    from t2x.objectives import _chunked, _unchunked

    x = jnp.arange(4 * 120).reshape(4, 120)
    for chunk_len, shape in ((64, (2, 2, 2 * 60)), (40, (3, 2, 2 * 40)), (50, (3, 2, 2 * 40)), (128, (1, 2, 2 * 120)),
                             (7, (18, 2, 2 * 7))):  # 18 chunks of 7: 126, the last padded by 6
        chunks = _chunked(x, chunk_len, 2)
        assert chunks.shape == shape, chunk_len
        assert np.array_equal(_unchunked(chunks, 4, 120), x)


def test_the_loss_and_evaluation_by_chunks_never_hold_the_whole_logits():
    batch, seq, width, vocab = 4, 64, 32, 4096
    logits_bytes = batch * seq * vocab * 4
    args = (jnp.ones((batch, seq, width)), jnp.ones((vocab, width)), jnp.zeros((batch, seq), jnp.int32),
            jnp.ones((batch, seq)))

    def temporary_bytes(loss):
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    def whole(h, w, t, weights):
        nll, _ = token_losses(VocabLogits(h, w).logits(), t)
        return jnp.sum(nll * weights)

    def chunked(h, w, t, weights):
        return chunked_lm_loss(VocabLogits(h, w), t, weights, 1.0, chunk_len=8)[0]

    assert temporary_bytes(whole) >= logits_bytes  # the logits and their gradient, [batch, seq, vocab] each
    assert temporary_bytes(chunked) < logits_bytes / 2  # a chunk's: an eighth of them

    def evaluation_bytes(chunk_len):  # evaluation's per-token NLL and prediction
        sums = lambda h, w, t, weights: token_predictions(VocabLogits(h, w), t, chunk_len)  # noqa: E731
        return jax.jit(sums).lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert evaluation_bytes(0) >= logits_bytes
    assert evaluation_bytes(8) < logits_bytes / 2


LOSS_CHUNK_RUNS = {
    "decoder, z-loss, smoothing, untied, 2 micro-batches": (tiny_config, [
        "train.z_loss=0.1", "train.label_smoothing=0.1", "model.tie_embeddings=false", "train.grad_accum_steps=2"]),
    "encoder (MLM bias), next sentence": (encoder_config, ["objective.next_sentence=true", "model.type_vocab_size=2"]),
    "encoder-decoder (T5: scaled, tied)": (seq2seq_config, []),
}


@pytest.mark.parametrize("run", list(LOSS_CHUNK_RUNS))
def test_loss_chunks_train_and_evaluate_as_the_whole_logits_on_a_sharded_mesh(tmp_path, run):
    """Two train steps, and the eval step's sums (NLL, tokens, exact predictions) before
    them, with the logits computed 12 positions at a time equal the whole logits'."""
    make, overrides = LOSS_CHUNK_RUNS[run]
    benches, sums = {}, {}
    for chunk_len in (0, 12):  # 12: rows of 32 in 3 chunks of 11, the last padded
        cfg = make(tmp_path, *overrides, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"train.loss_chunk_len={chunk_len}")
        bench = benches[chunk_len] = StepBench(cfg, batches=2)
        with sharding_context(bench.mesh):
            step = jax.jit(make_eval_step(bench.model, cfg, build(cfg).tokenizer))
            sums[chunk_len] = jax.device_get(step(bench.state.params, bench.device_batches[0], jnp.int32(0)))
        bench.run(2)
    assert sums[0].keys() == sums[12].keys() and sums[0]["tokens"] > 0
    for key, whole in sums[0].items():
        assert sums[12][key] == pytest.approx(whole, rel=1e-6), key
    whole, chunked = (benches[c] for c in (0, 12))
    for key in ("loss", "z_loss", "grad_norm", "param_norm", *(k for k in whole.last_metrics if k.endswith("_loss"))):
        assert chunked.last_metrics[key] == pytest.approx(whole.last_metrics[key], rel=1e-5), key
    for x, y in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(chunked.state.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_a_data_parallel_step_sums_the_projection_gradient_over_devices_once(tmp_path):
    """Each device keeps its own rows' sum over the chunks: no collective runs inside the
    loop over chunks (summed there, the [vocab, d_model] gradient would be all-reduced once
    a chunk)."""
    cfg = tiny_config(tmp_path, "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1", "model.scan_layers=false",
                      "train.loss_chunk_len=8")
    hlo = StepBench(cfg, batches=1).compiled.as_text()
    bodies = [c for c in hlo.split("\n\n") if c.split(" ", 1)[0] in {f"%{b}" for b in re.findall(r"body=%([\w.-]+)", hlo)}]
    assert bodies, "no loop body in the compiled step: the chunks' loop was not found"
    collective = r"\b(all-reduce|reduce-scatter|all-gather)(-start)?\("
    assert not any(re.search(collective, body) for body in bodies)
    assert re.search(collective, hlo)  # the gradients are summed over the 8 devices, after the loop
