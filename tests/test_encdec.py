"""The T5-style encoder-decoder: parameter counts, transformers' T5 on the same weights,
the original Transformer's positions, packing, decoding with a cache, sharding."""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2x.config import MeshConfig, ModelConfig, load_config
from t2x.hf import t5
from t2x.models import abstract_params, count_params
from t2x.models.encdec import EncoderDecoder, init_cache
from t2x.models.positions import relative_position_bucket, sinusoidal_positions
from t2x.parallel import batch_sharding, logical_to_shardings, make_mesh, sharding_context

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

T5_1_0 = ModelConfig(family="encoder_decoder", vocab_size=61, d_model=32, num_layers=2, num_decoder_layers=2,
                     num_heads=4, d_ff=64, max_seq_len=32, position="relative", relative_buckets=8,
                     relative_max_distance=16, mlp="relu", norm="rmsnorm", norm_eps=1e-6, use_bias=False,
                     tie_embeddings=True, init_std=0.3)
T5_1_1 = dataclasses.replace(T5_1_0, mlp="geglu", tie_embeddings=False, num_decoder_layers=3)
TRANSFORMER = dataclasses.replace(T5_1_0, position="sinusoidal", norm="layernorm", norm_position="post",
                                  use_bias=True)


def init_params(cfg, seed=0):
    """Parameters of ``cfg`` with noise on every leaf, so norm scales and biases are not trivial."""
    params = nn.unbox(jax.jit(EncoderDecoder(cfg).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def jitted(cfg):
    """``EncoderDecoder(cfg).apply``, compiled (one program compiles faster than many ops)."""
    return jax.jit(EncoderDecoder(cfg).apply, static_argnames="method")


def padded_inputs(rng, batch, enc_len, dec_len, vocab=61):
    """Random encoder and decoder tokens, each row one pair followed by padding (id 0)."""
    enc_real = rng.integers(enc_len // 2, enc_len + 1, batch)
    dec_real = rng.integers(dec_len // 2, dec_len + 1, batch)
    enc_real[0], dec_real[0] = enc_len, dec_len  # one row without padding
    enc_seg = (np.arange(enc_len)[None] < enc_real[:, None]).astype(np.int32)
    dec_seg = (np.arange(dec_len)[None] < dec_real[:, None]).astype(np.int32)
    enc = rng.integers(1, vocab, (batch, enc_len)).astype(np.int32) * enc_seg
    dec = rng.integers(1, vocab, (batch, dec_len)).astype(np.int32) * dec_seg
    return enc, dec, enc_seg, dec_seg


def transformers_t5(params, cfg: ModelConfig):
    """transformers' T5ForConditionalGeneration of ``cfg``'s shape holding ``params``, by
    t2x's T5 mapping (``t2x.hf.t5``)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = t5.hf_config(cfg, "float32", {"bos_token": 0, "eos_token": 1})
    model = T5ForConditionalGeneration(T5Config(**config, attn_implementation="eager")).eval()
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in t5.tensors(cfg, jax.device_get(params)).items()}
    head = state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}  # views of shared.weight
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    if head is not None:  # transformers 5 always ties lm_head; T5 1.1's is its own
        model.lm_head.weight = torch.nn.Parameter(head)
    return model


def test_parameter_counts_equal_the_published_ones():
    expected = {"t5_small": 60_506_624, "t5_base": 222_903_552,
                # 37000*512 shared + 6*(4*(512^2+512) + 512*2048+2048 + 2048*512+512 + 2*1024)
                # + 6*(the same + 4*(512^2+512) + 1024): no final norms after post-norm blocks
                "transformer_base": 63_082_496}
    for name, count in expected.items():
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert count_params(abstract_params(EncoderDecoder(cfg.model), 16)[0]) == count, name
    tiny = load_config(CONFIGS / "t5_tiny.yaml")
    assert tiny.model.vocab_size >= 4096 + 100  # the tokenizer's pieces and T5's sentinels


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("scan", [True, False])
def test_logits_equal_transformers_t5(version, scan):
    import torch

    cfg = dataclasses.replace(T5_1_0 if version == "1.0" else T5_1_1, scan_layers=scan)
    params = init_params(cfg)
    enc, dec, enc_seg, dec_seg = padded_inputs(np.random.default_rng(0), 3, 13, 9)
    logits = jitted(cfg)({"params": params}, enc, dec, encoder_segment_ids=enc_seg,
                                       decoder_segment_ids=dec_seg)
    with torch.no_grad():
        expected = transformers_t5(params, cfg)(
            input_ids=torch.from_numpy(enc).long(), attention_mask=torch.from_numpy(enc_seg),
            decoder_input_ids=torch.from_numpy(dec).long(), decoder_attention_mask=torch.from_numpy(dec_seg),
        ).logits.numpy()
    real = dec_seg > 0
    assert np.abs(expected[real]).max() > 0.5  # weights large enough that a mismatch would show
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], rtol=1e-4, atol=1e-4)


def test_relative_buckets_equal_the_mesh_tensorflow_formula():
    relative = np.arange(-300, 300)

    def reference(r, bidirectional, buckets=32, max_distance=128):
        offset = 0
        if bidirectional:
            buckets //= 2
            offset, r = (r > 0) * buckets, abs(r)
        else:
            r = max(-r, 0)
        exact = buckets // 2
        if r < exact:
            return offset + r
        large = exact + int(np.log(np.float32(r) / exact) / np.log(max_distance / exact) * (buckets - exact))
        return offset + min(large, buckets - 1)

    for bidirectional in (True, False):
        got = np.asarray(relative_position_bucket(jnp.asarray(relative), bidirectional, 32, 128))
        np.testing.assert_array_equal(got, [reference(r, bidirectional) for r in relative])


def test_sinusoidal_positions_equal_the_paper_formula():
    positions = np.array([[0, 1, 2, 7, 100, 511]])
    d = 32
    i = np.arange(d // 2, dtype=np.float64)
    angles = positions[..., None] / 10000.0 ** (2 * i / d)
    expected = np.zeros((*positions.shape, d))
    expected[..., 0::2], expected[..., 1::2] = np.sin(angles), np.cos(angles)
    np.testing.assert_allclose(np.asarray(sinusoidal_positions(jnp.asarray(positions), d)), expected, atol=2e-5)


def test_original_transformer_runs_with_shapes_from_its_config():
    cfg = load_config(CONFIGS / "transformer_base.yaml",
                      ["model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.num_layers=2",
                       "model.num_decoder_layers=3", "model.vocab_size=61", "model.dtype=float32"]).model
    params = init_params(cfg)
    assert "final_norm" not in params["encoder"]  # post-norm blocks end normed
    assert "bias" in params["decoder"]["blocks"]["layers"]["cross_attn"]["out"]
    enc, dec, enc_seg, dec_seg = padded_inputs(np.random.default_rng(1), 2, 11, 7)
    logits = jitted(cfg)({"params": params}, enc, dec, encoder_segment_ids=enc_seg,
                                       decoder_segment_ids=dec_seg)
    assert logits.shape == (2, 7, 61) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("cfg", [T5_1_1, TRANSFORMER], ids=["t5", "transformer"])
def test_packed_pairs_do_not_see_each_other(cfg):
    """A pair's logits are the same alone as packed after another pair."""
    rng = np.random.default_rng(2)
    model, params = jitted(cfg), init_params(cfg)
    enc_a, enc_b, dec_a, dec_b = (rng.integers(1, 61, n).astype(np.int32) for n in (5, 7, 4, 6))
    enc = np.concatenate([enc_a, enc_b, [0, 0]])[None]
    dec = np.concatenate([dec_a, dec_b, [0]])[None]
    enc_seg = np.array([[1] * 5 + [2] * 7 + [0, 0]], np.int32)
    dec_seg = np.array([[1] * 4 + [2] * 6 + [0]], np.int32)
    enc_pos = np.array([list(range(5)) + list(range(7)) + [0, 0]], np.int32)
    dec_pos = np.array([list(range(4)) + list(range(6)) + [0]], np.int32)
    packed = model({"params": params}, enc, dec, enc_pos, dec_pos, enc_seg, dec_seg)
    alone = model({"params": params}, enc_b[None], dec_b[None])
    np.testing.assert_allclose(packed[0, 4:10], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [T5_1_0, dataclasses.replace(TRANSFORMER, scan_layers=False)],
                         ids=["t5_scanned", "transformer_unscanned"])
def test_decoding_token_by_token_with_a_cache_equals_the_full_forward(cfg):
    model, apply, params = EncoderDecoder(cfg), jitted(cfg), init_params(cfg)
    enc, dec, enc_seg, dec_seg = padded_inputs(np.random.default_rng(3), 3, 10, 8)
    dec_seg[:] = 1  # each row one target to its end: the cache holds no padding
    full = np.asarray(apply({"params": params}, enc, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg))

    rows = jnp.array([2, 0, 3])  # the batch's rows in a cache of 4, not in order
    encoded = apply({"params": params}, enc, None, enc_seg, method="encode")
    cache = init_cache(cfg, 4, 8, enc.shape[1])
    prefill = 3  # the first tokens at once, with the encoder's states; then one per step without them
    logits, cache = apply({"params": params}, dec[:, :prefill], encoded, enc_seg,
                          jnp.broadcast_to(jnp.arange(prefill), (3, prefill)), cache=cache, rows=rows, method="decode")
    steps = [np.asarray(logits)]

    @jax.jit
    def step(cache, tokens, position):
        positions = jnp.full((3, 1), position)
        return model.apply({"params": params}, tokens, None, enc_seg, positions, cache=cache, rows=rows, window=8,
                           method="decode")

    for t in range(prefill, dec.shape[1]):
        logits, cache = step(cache, dec[:, t:t + 1], t)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


def test_sharded_logits_equal_unsharded():
    cfg = T5_1_1
    model, params = EncoderDecoder(cfg), init_params(cfg)
    enc, dec, enc_seg, dec_seg = padded_inputs(np.random.default_rng(4), 4, 12, 8)
    inputs = dict(encoder_tokens=enc, decoder_tokens=dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
    expected = np.asarray(jitted(cfg)({"params": params}, **inputs))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with sharding_context(mesh):
        abstract, logical = abstract_params(model, 12)
        shardings = logical_to_shardings(logical, abstract, mesh)
        placed = jax.tree.map(jax.device_put, params, shardings)
        assert any(len(s.spec) and any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
        inputs = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in inputs.items()}
        logits = jax.jit(lambda p, x: model.apply({"params": p}, **x))(placed, inputs)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)
