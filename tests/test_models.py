"""The model against the float64 NumPy reference, across every architecture option."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from t2x.config import ModelConfig
from t2x.models import build_model
from t2x.models.attention import attention_mask
from t2x.models.transformer import loop_left, scan_unroll

BASE = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, d_ff=48, max_seq_len=16, init_std=0.1)


def packed_inputs(rng, batch=3, seq=16, vocab=97):
    """Random tokens in rows holding several documents and trailing padding."""
    tokens = rng.integers(0, vocab, (batch, seq))
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        cuts = sorted(rng.choice(np.arange(1, seq - 2), size=2, replace=False)) + [seq - b]
        start = 0
        for seg, end in enumerate(cuts, start=1):
            segment_ids[b, start:end] = seg
            positions[b, start:end] = np.arange(end - start)
            start = end
    return tokens.astype(np.int32), positions, segment_ids


def init_params(cfg, tokens, seed=0):
    model = build_model(cfg)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.asarray(tokens))["params"])
    # Non-trivial norm scales and biases, so the reference is checked on them too.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(treedef, leaves)


VARIANTS = {
    "gpt2": {},
    "rope_rmsnorm_swiglu_untied": dict(position="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, use_bias=False),
    "grouped_query": dict(num_kv_heads=2, position="rope"),
    "multi_query_unscanned": dict(num_kv_heads=1, scan_layers=False),
    "remat_full": dict(remat="full"),
    "remat_dots": dict(remat="dots", num_kv_heads=2),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_float64_reference(name):
    cfg = dataclasses.replace(BASE, **VARIANTS[name])
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(0))
    model, params = init_params(cfg, tokens)
    logits = model.apply({"params": params}, tokens, positions, segment_ids)
    expected = reference.forward(params, cfg, tokens, positions, segment_ids)
    assert logits.dtype == jnp.float32
    real = segment_ids > 0
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], rtol=2e-4, atol=2e-4)


def test_bfloat16_compute_stays_close_to_float64_reference():
    cfg = dataclasses.replace(BASE, dtype="bfloat16")
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(1))
    model, params = init_params(cfg, tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params)), "parameters stay float32"
    logits = np.asarray(model.apply({"params": params}, tokens, positions, segment_ids))
    expected = reference.forward(params, cfg, tokens, positions, segment_ids)
    real = segment_ids > 0
    error = np.abs(logits[real] - expected[real]).max() / np.abs(expected[real]).max()
    assert error < 0.03


def test_packed_documents_do_not_see_each_other():
    """Logits of a document are the same alone or packed after another one."""
    cfg = dataclasses.replace(BASE, position="rope")
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(0, 97, 6), rng.integers(0, 97, 9)
    packed = np.concatenate([doc_a, doc_b, [0]])[None].astype(np.int32)
    segment_ids = np.array([[1] * 6 + [2] * 9 + [0]], np.int32)
    positions = np.array([list(range(6)) + list(range(9)) + [0]], np.int32)
    model, params = init_params(cfg, packed)
    together = model.apply({"params": params}, packed, positions, segment_ids)
    alone = model.apply({"params": params}, doc_b[None].astype(np.int32))
    np.testing.assert_allclose(together[0, 6:15], alone[0], rtol=1e-5, atol=1e-5)


def test_scan_and_unrolled_layers_compute_the_same_function():
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(3))
    scanned_model, params = init_params(BASE, tokens)
    unrolled_cfg = dataclasses.replace(BASE, scan_layers=False)
    layers = params["blocks"]["layers"]
    unrolled = dict(params, blocks={f"layers_{i}": jax.tree.map(lambda x: x[i], layers) for i in range(2)})
    a = scanned_model.apply({"params": params}, tokens, positions, segment_ids)
    b = build_model(unrolled_cfg).apply({"params": unrolled}, tokens, positions, segment_ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_an_unrolled_scan_keeps_the_loops_parameters_and_function():
    """``model.scan_unroll = num_layers`` (the default on a CPU): the same stacked parameters
    and the same outputs and gradients as the loop (``scan_unroll = 1``, the default on
    accelerators), with no loop left in the compiled gradient; under remat the blocks'
    forward products are still computed again in the backward pass."""
    import re

    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(3))

    def compiled_grad(cfg):
        model, params = init_params(cfg, tokens)
        grad = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens, positions, segment_ids) ** 2)))
        return params, grad(params), grad.lower(params).compile().as_text()

    loop_params, loop_grads, loop_hlo = compiled_grad(dataclasses.replace(BASE, scan_unroll=1))
    params, grads, hlo = compiled_grad(BASE)
    assert scan_unroll(BASE, BASE.num_layers, "cpu") == BASE.num_layers
    assert jax.tree.structure(params) == jax.tree.structure(loop_params)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loop_params)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(loop_grads)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert re.search(r"\bwhile\(", loop_hlo) and not re.search(r"\bwhile\(", hlo)
    for backend in ("gpu", "tpu"):
        assert scan_unroll(BASE, BASE.num_layers, backend) == 1
    assert scan_unroll(dataclasses.replace(BASE, scan_unroll=1), BASE.num_layers, "cpu") == 1
    assert not loop_left(BASE, "cpu") and loop_left(BASE, "gpu")
    assert loop_left(dataclasses.replace(BASE, scan_unroll=1), "cpu")
    assert not loop_left(dataclasses.replace(BASE, scan_layers=False, scan_unroll=1), "gpu")
    deeper_decoder = dataclasses.replace(BASE, family="encoder_decoder", num_decoder_layers=BASE.num_layers + 1,
                                         scan_unroll=BASE.num_layers)
    assert loop_left(deeper_decoder, "cpu") and not loop_left(dataclasses.replace(deeper_decoder, scan_unroll=None), "cpu")
    dots = [len(re.findall(r"\bdot\(", compiled_grad(dataclasses.replace(BASE, scan_unroll=2, remat=r))[2]))
            for r in ("none", "full")]
    assert dots[1] > dots[0]  # remat's recomputation is not merged away


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_leaves_gradients_unchanged(policy):
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(4))
    model, params = init_params(BASE, tokens)
    remat_model = build_model(dataclasses.replace(BASE, remat=policy))

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, tokens, positions, segment_ids) ** 2)

    g = jax.grad(lambda p: loss(model, p))(params)
    g_remat = jax.grad(lambda p: loss(remat_model, p))(params)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_dropout_is_active_only_when_not_deterministic():
    cfg = dataclasses.replace(BASE, dropout=0.5)
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(5))
    model, params = init_params(cfg, tokens)
    apply = lambda det, seed: model.apply(  # noqa: E731
        {"params": params}, tokens, positions, segment_ids, deterministic=det, rngs={"dropout": jax.random.key(seed)}
    )
    np.testing.assert_array_equal(apply(True, 0), apply(True, 1))
    assert not np.allclose(apply(False, 0), apply(False, 1))


def test_every_parameter_has_logical_axis_names():
    model = build_model(dataclasses.replace(BASE, mlp="swiglu", tie_embeddings=False))
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32)), jax.random.key(0))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)


def test_attention_mask_is_causal_within_segments():
    segment_ids = jnp.array([[1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(segment_ids, 5))[0, 0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_reference(kv_heads):
    rng = np.random.default_rng(6)
    q = rng.normal(size=(2, 7, 4, 8))
    k, v = rng.normal(size=(2, 7, kv_heads, 8)), rng.normal(size=(2, 7, kv_heads, 8))
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
    out = jax.nn.dot_product_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask=attention_mask(jnp.asarray(segment_ids), 7)
    )
    expected = reference.attention(q, k, v, reference.mask_of(segment_ids))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_runs_accumulate_logits_in_float32(tied):
    """The output projection takes bfloat16 operands but is never rounded to bfloat16:
    its logits equal a float64 product of the same rounded operands to float32 precision."""
    cfg = dataclasses.replace(BASE, dtype="bfloat16", tie_embeddings=tied, use_bias=False)
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(7))
    model, params = init_params(cfg, tokens)
    logits, state = model.apply({"params": params}, tokens, positions, segment_ids,
                                capture_intermediates=lambda mdl, _: mdl.name == "final_norm")
    hidden = np.asarray(state["intermediates"]["final_norm"]["__call__"][0], np.float64)  # bfloat16 values
    table = params["embed"]["embedding"].T if tied else params["lm_head"]["kernel"]
    expected = hidden @ np.asarray(jnp.asarray(table, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
    assert np.mean(np.asarray(logits) == np.asarray(logits).astype(jnp.bfloat16).astype(np.float32)) < 0.1


def test_importing_t2x_selects_the_cpu_schedule_that_cannot_deadlock():
    import os

    import t2x  # noqa: F401

    # Set before this process created its CPU backend (conftest imports t2x first).
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in os.environ["XLA_FLAGS"]
    assert len(jax.devices()) == 8


def test_causal_attention_blocks_widen_from_512_tokens():
    from t2x.models.attention import causal_block

    assert [causal_block(n) for n in (128, 256, 512, 576, 1024)] == [64, 64, 128, 64, 128]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_by_blocks_is_the_full_computation(kv_heads, causal):
    """Blocks of queries (causal: over the keys up to their last): the same outputs and
    gradients (the bias's too) as one segment-masked attention over the whole row (with
    a bias, T5's way), and the float64 reference's, for multi-head, grouped and
    multi-query attention."""
    from t2x.models.attention import CAUSAL_BLOCK, blocked_attention

    rng = np.random.default_rng(7)
    seq = 4 * CAUSAL_BLOCK
    q = jnp.asarray(rng.normal(size=(2, seq, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, seq, kv_heads, 8)), jnp.float32) for _ in range(2))
    _, _, segment_ids = packed_inputs(rng, batch=2, seq=seq)
    mask = attention_mask(jnp.asarray(segment_ids), seq, causal=causal)
    bias = jnp.asarray(rng.normal(size=(1, 4, seq, seq)), jnp.float32)
    for b in (None, bias):
        def full(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, bias=b, mask=mask)

        # the blocks of short rows and of rows from 512 tokens; 96 leaves the last one short
        for block in (CAUSAL_BLOCK, 2 * CAUSAL_BLOCK, 96):
            def blocked(q, k, v, block=block):
                return blocked_attention(q, k, v, mask, b, scale=None, block=block, causal=causal)

            np.testing.assert_allclose(jax.jit(blocked)(q, k, v), jax.jit(full)(q, k, v), rtol=1e-6, atol=1e-6)
            grads = [jax.jit(jax.grad(lambda *x, f=f: jnp.sum(f(*x) ** 2), argnums=(0, 1, 2)))(q, k, v)
                     for f in (blocked, full)]
            for a, c in zip(*grads):
                np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    bias_grads = [jax.jit(jax.grad(lambda b, f=f: jnp.sum(f(q, k, v, mask, b) ** 2)))(bias)
                  for f in (lambda *x: blocked_attention(*x, scale=None, causal=causal),
                            lambda q, k, v, m, b: jax.nn.dot_product_attention(q, k, v, bias=b, mask=m))]
    np.testing.assert_allclose(*bias_grads, rtol=1e-5, atol=1e-5)  # T5's relative bias learns through it
    expected = reference.attention(*(np.asarray(x, np.float64) for x in (q, k, v)),
                                   reference.mask_of(segment_ids, causal=causal))
    np.testing.assert_allclose(blocked_attention(q, k, v, mask, None, None, causal=causal), expected,
                               rtol=1e-5, atol=1e-5)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))  # bfloat16 in, float32 softmax, bfloat16 out
    out16 = blocked_attention(q16, k16, v16, mask, None, None, causal=causal)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), expected, atol=3e-2)


def test_sum_over_the_last_axis_is_the_float64_sum():
    """The row sums the attention gradient and the loss take by a product with ones on a
    CPU: float64 NumPy's sums of rows of mixed signs and magnitudes, to float32 rounding."""
    from t2x.models.layers import sum_last_axis

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 5, 77)) * np.exp(rng.uniform(-8, 8, size=(2, 3, 5, 1)))
    got = jax.jit(sum_last_axis)(jnp.asarray(x, jnp.float32))
    assert got.shape == (2, 3, 5)
    expected = np.sum(np.asarray(x, np.float32).astype(np.float64), axis=-1)
    assert np.all(np.abs(np.asarray(got, np.float64) - expected) <= 1e-6 * np.abs(x).sum(-1))  # row by row


def _dot_types(hlo: str) -> list[tuple[str, str, str]]:
    """(left, right, result) element types of every dot in a compiled program's HLO text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = re.findall(r"= (\w+)\[[^=]*? dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return [(types[a], types[b], out) for out, a, b in dots]


@pytest.mark.parametrize("lhs_shape,kernel_shape,dims", [
    ((48, 24), (24, 4, 8), ((1,), (0,))),  # query, key and value projections: [d_model, heads, head_dim]
    ((6, 8, 4, 8), (4, 8, 24), ((2, 3), (0, 1))),  # attention output: [heads, head_dim, d_model]
    ((48, 24), (40, 24), ((1,), (1,))),  # a tied embedding table read as the output projection
], ids=["heads_out", "heads_in", "transposed_table"])
def test_bfloat16_dense_products_and_their_gradients_are_float32_products_rounded(lhs_shape, kernel_shape, dims):
    """Each bfloat16 product of a dense layer and of its gradient equals the float64 product
    of the same bfloat16 operands rounded to bfloat16 (to one unit in the last place); and
    on a CPU every product is computed from bfloat16 operands into float32, the form
    XLA:CPU runs on its bfloat16 matrix units."""
    from t2x.models.layers import compute_dot_general, rows_dot

    rng = np.random.default_rng(11)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in (lhs_shape, kernel_shape))
    dimension_numbers = (dims, ((), ()))

    def product(x, w):
        return rows_dot(compute_dot_general, x, w, dimension_numbers)

    out, vjp = jax.vjp(product, x, w)
    g = jnp.asarray(rng.normal(size=out.shape), jnp.bfloat16)
    dx, dw = vjp(g)
    assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    f64 = [np.asarray(a, np.float64) for a in (x, w, g)]
    expected_out = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers), *f64[:2])
    exp_dx, exp_dw = expected_out[1](f64[2])
    for got, expected in [(out, expected_out[0]), (dx, exp_dx), (dw, exp_dw)]:
        got, expected = np.asarray(got, np.float64), np.asarray(expected)
        rounded = np.asarray(jnp.asarray(expected, jnp.float32).astype(jnp.bfloat16), np.float64)
        assert np.all(np.abs(got - expected) <= np.abs(expected) * 2.0**-7 + 1e-30)  # within one bfloat16 step
        assert np.mean(got == rounded) > 0.9  # mostly the correctly rounded value
    if jax.default_backend() == "cpu":
        hlo = jax.jit(lambda x, w, g: jax.vjp(product, x, w)[1](g)).lower(x, w, g).compile().as_text()
        dots = _dot_types(hlo)
        assert dots and all(d == ("bf16", "bf16", "f32") for d in dots), dots


def test_a_decoder_long_enough_for_attention_blocks_matches_the_float64_reference():
    from t2x.models.attention import CAUSAL_BLOCK, self_attention_kernel

    seq = 2 * CAUSAL_BLOCK
    cfg = dataclasses.replace(BASE, max_seq_len=seq)
    assert self_attention_kernel(cfg, seq, has_bias=False, causal=True) == "xla_blocks"
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(3), seq=seq)
    model, params = init_params(cfg, tokens)
    logits = model.apply({"params": params}, tokens, positions, segment_ids)
    expected = reference.forward(params, cfg, tokens, positions, segment_ids)
    real = segment_ids > 0
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("attention,dtype,head_dim,bias,causal,backend,seq,expected", [
    ("auto", "bfloat16", 64, False, True, "gpu", 1024, "cudnn"),
    ("auto", "bfloat16", 64, False, False, "gpu", 512, "cudnn"),  # an encoder's
    ("auto", "bfloat16", 128, False, True, "gpu", 1024, "cudnn"),
    ("auto", "float32", 64, False, True, "gpu", 1024, "xla"),  # cuDNN has no float32 kernel
    ("auto", "bfloat16", 64, True, True, "gpu", 1024, "xla"),  # T5's logit bias
    ("auto", "bfloat16", 160, False, True, "gpu", 1024, "xla"),  # head_dim > 128
    ("auto", "bfloat16", 60, False, True, "gpu", 1024, "xla"),  # not a multiple of 8
    ("auto", "bfloat16", 64, False, True, "tpu", 1024, "xla"),
    ("auto", "float32", 64, False, True, "cpu", 1024, "xla_blocks"),
    ("auto", "float32", 64, False, False, "cpu", 1000, "xla_blocks"),  # an encoder's: any length
    ("auto", "float32", 64, True, False, "cpu", 1024, "xla_blocks"),  # T5's encoder
    ("auto", "float32", 64, False, True, "cpu", 96, "xla"),  # not whole blocks
    ("xla", "bfloat16", 64, False, True, "gpu", 1024, "xla_blocks"),
    ("cudnn", "bfloat16", 64, True, True, "gpu", 1024, "cudnn"),
])
def test_self_attention_kernel_choice(attention, dtype, head_dim, bias, causal, backend, seq, expected):
    from t2x.models.attention import self_attention_kernel

    cfg = dataclasses.replace(BASE, attention=attention, dtype=dtype, d_model=4 * head_dim, num_heads=4)
    assert cfg.head_size == head_dim
    assert self_attention_kernel(cfg, seq, has_bias=bias, causal=causal, backend=backend) == expected


def test_packed_segments_describe_each_run_of_a_row():
    from t2x.models.attention import packed_segments

    rng = np.random.default_rng(0)
    rows = [[1, 1, 1, 2, 2, 3, 0, 0], [1] * 8, [1, 2, 3, 4, 5, 6, 7, 8], [1, 1, 2, 2, 2, 2, 2, 0]]
    for _ in range(20):  # random packings: runs of random lengths, padding at the end
        cuts = np.sort(rng.choice(np.arange(1, 8), rng.integers(0, 5), replace=False))
        ids = np.zeros(8, np.int64)
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, 8])):
            ids[a:b] = i + 1
        ids[8 - rng.integers(0, 3):] = 0
        rows.append(ids.tolist())
    lengths, offsets = (np.asarray(x) for x in packed_segments(jnp.asarray(rows, jnp.int32)))
    assert lengths.shape == (len(rows), 8) and offsets.shape == (len(rows), 9)
    for row, length, offset in zip(rows, lengths, offsets):
        runs = [(i, j) for i, j in zip([0] + [p for p in range(1, 8) if row[p] != row[p - 1]],
                                       [p for p in range(1, 8) if row[p] != row[p - 1]] + [8])]
        n = len(runs)
        assert offset[:n].tolist() == [a for a, _ in runs] and (offset[n:] == -1).all()
        assert length[:n].tolist() == [b - a for a, b in runs] and (length[n:] == -1).all()
        assert length[:n].sum() == 8  # padding is a run of its own: every token is in one
    lengths, offsets = packed_segments(jnp.asarray(rows, jnp.int32), max_segments=3)
    assert lengths.shape == (len(rows), 3) and offsets.shape == (len(rows), 4)
    assert np.asarray(offsets)[0].tolist() == [0, 3, 5, -1]


def _dot_input_dtypes(fn, *args, vocab=None):
    """The operand dtypes of every dot_general in ``fn``'s jaxpr (nested ones included),
    or of those with a dimension of size ``vocab``."""
    from jax.extend.core import jaxprs_in_params

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and (vocab is None or vocab in eqn.outvars[0].aval.shape
                                                         or any(vocab in v.aval.shape for v in eqn.invars)):
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_float32_dot_general_returns_float32_and_takes_gradients_in_the_operands_dtype():
    from t2x.models.layers import float32_dot_general

    rng = np.random.default_rng(0)
    x64, w64, g64 = rng.standard_normal((2, 5, 16)), rng.standard_normal((24, 16)), rng.standard_normal((2, 5, 24))
    dims = (((2,), (1,)), ((), ()))
    for dtype in (jnp.float32, jnp.bfloat16):
        x, w = jnp.asarray(x64, dtype), jnp.asarray(w64, dtype)
        g = jnp.asarray(g64, jnp.float32)

        def ours(x, w):
            return jnp.sum(float32_dot_general(x, w, dims) * g)

        out = float32_dot_general(x, w, dims)
        assert out.dtype == jnp.float32
        xr, wr = (np.asarray(a, np.float64) for a in (x, w))  # the operands as given, exactly
        np.testing.assert_allclose(out, xr @ wr.T, rtol=1e-5, atol=1e-5)
        dx, dw = jax.grad(ours, argnums=(0, 1))(x, w)
        assert dx.dtype == dtype and dw.dtype == dtype
        gr = np.asarray(g.astype(dtype), np.float64)  # the cotangent rounded to the operands' dtype
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(dx, np.float64), gr @ wr, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum("bsv,bsd->vd", gr, xr), rtol=tol, atol=tol)
        if dtype == jnp.float32:  # exactly lax.dot_general's, values and gradients
            def plain(x, w):
                return jnp.sum(jax.lax.dot_general(x, w, dims) * g)
            for a, b in zip(jax.grad(ours, argnums=(0, 1))(x, w), jax.grad(plain, argnums=(0, 1))(x, w)):
                np.testing.assert_array_equal(a, b)
        else:  # every product, forward and backward, multiplies bfloat16 operands
            dtypes = _dot_input_dtypes(jax.grad(ours, argnums=(0, 1)), x, w)
            assert len(dtypes) >= 3 and all(d == ("bfloat16", "bfloat16") for d in dtypes), dtypes


@pytest.mark.parametrize("tied", [True, False])
def test_a_bfloat16_models_vocabulary_projection_multiplies_bfloat16_both_ways(tied):
    cfg = dataclasses.replace(BASE, dtype="bfloat16", tie_embeddings=tied)
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(5))
    model, params = init_params(cfg, tokens)

    def loss(params):
        return jnp.mean(model.apply({"params": params}, tokens, positions, segment_ids))

    dtypes = _dot_input_dtypes(jax.grad(loss), params, vocab=cfg.vocab_size)
    assert len(dtypes) >= 3 and all(d == ("bfloat16", "bfloat16") for d in dtypes), dtypes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_small_tables_are_looked_up_by_one_hot_products_exactly_and_without_a_scatter(dtype):
    from t2x.models.layers import Embed

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=(4, 9)))
    gather, one_hot = nn.Embed(3, 8, dtype=dtype), Embed(3, 8, dtype=dtype)
    params = gather.init(jax.random.key(0), ids)
    assert jax.tree.map(jnp.shape, one_hot.init(jax.random.key(0), ids)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(one_hot.apply(params, ids), gather.apply(params, ids))  # exact, in either dtype
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(4, 9, 8)), dtype)

    def table_grad(module):
        return jax.grad(lambda p: jnp.sum((module.apply(p, ids) * cotangent).astype(jnp.float32)))(params)

    np.testing.assert_allclose(table_grad(one_hot)["params"]["embedding"], table_grad(gather)["params"]["embedding"],
                               rtol=1e-5 if dtype == jnp.float32 else 2e-2, atol=1e-5 if dtype == jnp.float32 else 0.1)
    hlo = jax.jit(lambda: table_grad(one_hot)).lower().compile().as_text()
    assert not re.search(r"\bscatter\(", hlo)


def test_rows_taken_with_sorted_gradients_equal_a_gathers_gradients():
    from t2x.models.layers import take_rows

    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(50, 6)), jnp.float32)
    ids = jnp.asarray(np.where(rng.random((7, 40)) < 0.4, 3, rng.integers(0, 50, size=(7, 40))))  # one id 40%+
    cotangent = jnp.asarray(rng.normal(size=(7, 40, 6)), jnp.float32)
    np.testing.assert_array_equal(take_rows(table, ids, 50), jnp.take(table, ids, axis=0))
    sorted_grad = jax.jit(jax.grad(lambda t: jnp.sum(take_rows(t, ids, 50) * cotangent)))(table)
    expected = np.zeros((50, 6))
    np.add.at(expected, np.asarray(ids).reshape(-1), np.asarray(cotangent, np.float64).reshape(-1, 6))
    np.testing.assert_allclose(sorted_grad, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(sorted_grad)[np.setdiff1d(np.arange(50), np.asarray(ids))] == 0)  # rows never taken
    # batch rows split over devices: the same gradient, and no device gathers another's rows to sort them
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    ids8, cotangent8 = jnp.concatenate([ids, ids[:1]]), jnp.concatenate([cotangent, cotangent[:1]])
    grad_of = jax.jit(jax.grad(lambda t, i, c: jnp.sum(take_rows(t, i, 50) * c)))
    sharded = grad_of(table, jax.device_put(ids8, by_batch), jax.device_put(cotangent8, by_batch))
    np.testing.assert_allclose(sharded, grad_of(table, ids8, cotangent8), rtol=1e-5, atol=1e-5)
    hlo = grad_of.lower(table, jax.device_put(ids8, by_batch), jax.device_put(cotangent8, by_batch)).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_a_decoder_with_sorted_embedding_gradients_gets_the_gathers_gradients(monkeypatch):
    from t2x.models import layers

    cfg = dataclasses.replace(BASE, max_seq_len=32)  # more than ONE_HOT_ROWS positions: both tables gathered
    tokens, positions, segment_ids = packed_inputs(np.random.default_rng(1), seq=32, vocab=5)  # few ids: long runs
    model, params = init_params(cfg, tokens)

    def grads():
        loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, positions, segment_ids) ** 2)
        return jax.jit(jax.grad(loss))(params)  # traced anew each call: the path is chosen at trace time

    by_scatter = grads()
    monkeypatch.setattr(layers, "row_gradients_by_sorting", lambda: True)
    by_sorting = grads()
    assert jax.tree.structure(by_scatter) == jax.tree.structure(by_sorting)
    for a, b in zip(jax.tree.leaves(by_scatter), jax.tree.leaves(by_sorting)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_rows_dot_is_the_product_and_its_weight_gradient_copies_no_transposed_cotangent():
    from t2x.models.layers import rows_dot

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 64, 32)), jnp.float32)
    heads = jnp.asarray(rng.normal(size=(4, 64, 2, 16)), jnp.float32)
    cases = [(x, rng.normal(size=(512, 32)), (((2,), (1,)), ((), ()))),  # tied logits: [batch, seq, vocab]
             (heads, rng.normal(size=(2, 16, 8)), (((2, 3), (0, 1)), ((), ()))),  # attention out: heads in
             (x, rng.normal(size=(4, 32, 8)), (((2,), (1,)), ((0,), (0,))))]  # batch dims: the plain product
    for lhs, rhs, dims in cases:
        rhs = jnp.asarray(rhs, jnp.float32)
        np.testing.assert_allclose(rows_dot(jax.lax.dot_general, lhs, rhs, dims), jax.lax.dot_general(lhs, rhs, dims),
                                   rtol=1e-5, atol=1e-5)

    table = jnp.asarray(cases[0][1], jnp.float32)
    dims = cases[0][2]

    def table_gradient_hlo(dot):
        loss = lambda t: jnp.sum(jnp.exp(dot(x, t, dims)))  # a cotangent made by an elementwise pass, as softmax's
        return jax.jit(jax.grad(loss)).lower(table).compile().as_text()

    transposed = re.compile(r"f32\[512,256\]")  # the [vocab, tokens] cotangent
    assert transposed.search(table_gradient_hlo(jax.lax.dot_general))  # two contracted dimensions: copied transposed
    assert not transposed.search(table_gradient_hlo(functools.partial(rows_dot, jax.lax.dot_general)))
