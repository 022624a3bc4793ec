"""Model FLOPs follow MaxText's calculate_tflops_training_per_device convention."""

import pytest

from conftest import REPO
from t2x.config import ModelConfig
from t2x.flops import matmul_params, peak_flops_per_device, training_flops_per_step

GPT2_SMALL = ModelConfig(vocab_size=50304, d_model=768, num_layers=12, num_heads=12, d_ff=3072)


def maxtext_training_flops(batch, seq, emb, mlp, heads, kv_heads, head_dim, layers, vocab, gated):
    """MaxText's formula, written out independently (per step, all devices)."""
    ffn = 2 * batch * seq * mlp * emb * (3 if gated else 2)
    qkv = 2 * batch * seq * emb * (heads + 2 * kv_heads) * head_dim
    projection = 2 * batch * seq * emb * heads * head_dim
    causal_attention = 4 * batch * seq * seq * heads * head_dim / 2
    embedding = 2 * batch * seq * emb * vocab
    learnable = ((ffn + qkv + projection) * layers + embedding) * 3
    return learnable + causal_attention * layers * 3


def test_gpt2_small_matmul_parameters():
    # 12 layers x (4 d^2 attention + 8 d^2 MLP) + the 50304 x 768 unembedding.
    assert matmul_params(GPT2_SMALL) == 12 * 12 * 768**2 + 50304 * 768 == 123_568_128


@pytest.mark.parametrize("mlp, kv_heads", [("gelu", None), ("swiglu", 4)])
def test_training_flops_match_maxtext(mlp, kv_heads):
    cfg = ModelConfig(vocab_size=32000, d_model=1024, num_layers=8, num_heads=16, num_kv_heads=kv_heads,
                      d_ff=2816, mlp=mlp)
    expected = maxtext_training_flops(4, 2048, 1024, 2816, 16, kv_heads or 16, 64, 8, 32000, mlp == "swiglu")
    assert training_flops_per_step(cfg, batch_size=4, seq_len=2048) == pytest.approx(expected, rel=1e-12)


def test_dense_part_is_six_flops_per_parameter_per_token():
    tokens = 8 * 1024
    attention = 3 * 4 * 8 * 1024**2 * 12 * 64 * 12 / 2
    total = training_flops_per_step(GPT2_SMALL, batch_size=8, seq_len=1024)
    assert total - attention == pytest.approx(6 * matmul_params(GPT2_SMALL) * tokens)
    assert training_flops_per_step(GPT2_SMALL, 8, 1024, causal=False) - total == pytest.approx(attention)


def test_peak_flops_by_device_kind():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("cpu", override=1e12) == 1e12


@pytest.mark.parametrize("variant", [
    {},
    {"mlp": "swiglu", "num_kv_heads": 4, "position": "rope", "norm": "rmsnorm", "tie_embeddings": False, "use_bias": False},
])
def test_forward_flops_are_what_xla_counts_in_the_model(variant):
    """XLA's own cost analysis of the model's forward pass (an independent count of the
    program t2x runs) agrees with the formula: it sees the attention of each block of 64
    queries over the keys up to its last (the causal blocks of a CPU's XLA attention:
    (n + 1) / 2n of the full matrix for n blocks), plus a fraction of a percent of
    element-wise work the formula leaves out."""
    from t2x.models.attention import CAUSAL_BLOCK
    import jax
    import jax.numpy as jnp

    from t2x.models import abstract_params, build_model

    cfg = ModelConfig(vocab_size=4096, d_model=1024, num_layers=2, num_heads=8, d_ff=4096, max_seq_len=256,
                      scan_layers=False, **variant)  # unrolled: XLA counts a scanned loop's body once
    model = build_model(cfg)
    params, _ = abstract_params(model, 256)
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    counted = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).cost_analysis()["flops"]
    full = training_flops_per_step(cfg, batch_size=2, seq_len=256, causal=False) / 3
    causal = training_flops_per_step(cfg, batch_size=2, seq_len=256, causal=True) / 3
    blocks = 256 // CAUSAL_BLOCK
    formula = causal + (full - causal) * 2 * ((blocks + 1) / (2 * blocks) - 0.5)  # attention: (n+1)/2n of full
    assert 1.0 <= counted / formula < 1.005


def test_encoder_decoder_flops_count_each_stack_over_its_own_rows():
    from t2x.config import load_config

    m = load_config(REPO / "configs" / "t5_small.yaml").model  # 6 + 6 layers, d 512, 8 x 64 heads, d_ff 2048, relu
    b, s, t, d, inner = 2, 512, 114, 512, 8 * 64
    attention = 4 * d * inner  # q, k, v, o
    encoder = 2 * b * s * 6 * (attention + 2 * d * 2048) + 4 * b * 8 * 64 * 6 * s * s
    decoder_dense = 2 * b * 6 * (t * (attention + 2 * d * inner + 2 * d * 2048) + s * 2 * d * inner)
    decoder_scores = 4 * b * 8 * 64 * 6 * (t * t / 2 + t * s)
    expected = 3 * (encoder + decoder_dense + decoder_scores + 2 * b * t * d * 32128)
    assert training_flops_per_step(m, b, s, target_len=t) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("predictions", [256, 64])
def test_an_encoders_forward_flops_at_the_predicted_positions_are_what_xla_counts(predictions):
    """With ``predict_at``, an encoder runs its masked-LM transform and vocabulary
    projection at those positions alone, as the formula's ``predictions`` counts."""
    import jax
    import jax.numpy as jnp

    from t2x.models import abstract_params, build_model

    cfg = ModelConfig(family="encoder", vocab_size=8192, d_model=512, num_layers=2, num_heads=8, d_ff=2048,
                      max_seq_len=256, scan_layers=False)
    model = build_model(cfg)
    params, _ = abstract_params(model, 256)
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    at = {"predict_at": jax.ShapeDtypeStruct((2, predictions), jnp.int32)} if predictions < 256 else {}
    counted = jax.jit(lambda p, t, kw: model.apply({"params": p}, t, **kw)).lower(params, tokens, at).cost_analysis()
    formula = training_flops_per_step(cfg, batch_size=2, seq_len=256, predictions=predictions) / 3
    assert 1.0 <= counted["flops"] / formula < 1.01  # element-wise work besides: 0.4-0.6%


@pytest.mark.parametrize("config", ["tiny.yaml", "bert_tiny.yaml", "t5_tiny.yaml"])
def test_a_classifiers_flops_are_its_backbones_without_the_language_model_head(config):
    """A classifier's step counts its backbone alone (an encoder-decoder's encoder): XLA's
    count of its forward pass agrees, as it does not with the pretraining formula."""
    import jax
    import jax.numpy as jnp

    from t2x.config import load_config
    from t2x.families import task
    from t2x.flops import run_flops_per_step
    from t2x.models import abstract_params

    cfg = load_config(REPO / "configs" / config, [
        "classify.labels=[a,b]", "data.format=csv", "train.sample_tokens=0", "model.scan_layers=false",
        "model.max_seq_len=64", "data.seq_len=64", "train.global_batch_size=2", "mesh.data=1", "data.num_shards=1",
        "model.d_model=512", "model.d_ff=2048"])  # wide enough for the products to outweigh element-wise work
    model = task(cfg).model(cfg.model)
    params, _ = abstract_params(model, 64)
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)  # one causal block of 64 queries: a decoder's XLA attention
    counted = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).cost_analysis()["flops"]
    scores = 4 * 2 * cfg.model.num_heads * cfg.model.head_size * 64**2 * cfg.model.num_layers
    formula = run_flops_per_step(cfg) / 3 + (scores / 2 if cfg.model.family == "decoder" else 0)  # computes them all
    assert 1.0 <= counted / formula < 1.03
    assert counted / (training_flops_per_step(cfg.model, 2, 64) / 3) < 0.9  # the language model's is not it
