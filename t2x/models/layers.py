"""Building blocks shared by every model family: dense, norm, MLP, rotary positions.

Every parameter carries logical axis names (``logical``), which
``t2x.parallel.sharding.LOGICAL_RULES`` maps onto the device mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """Dtype of activations and matmuls; parameters are always float32."""
    return DTYPES[cfg.dtype]


def logical(init, axes: Sequence[str | None]):
    """``init`` boxed with the parameter's logical axis names (mapped onto the mesh by
    ``LOGICAL_RULES``). The box applies no sharding constraint when unboxed: parameters
    enter the jitted step with their shardings, and Flax unboxes a multi-dimensional
    ``DenseGeneral`` kernel while it still has its flattened shape, which a constraint
    with the kernel's names would not fit."""
    return nn.with_logical_partitioning(init, tuple(axes), rules=())


def residual_init_std(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return cfg.init_std / math.sqrt(2 * cfg.num_layers)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical axis names."""
    return nn.with_logical_constraint(x, tuple(names))


def _matrices(lhs: jax.Array, rhs: jax.Array, dimension_numbers):
    """``lhs`` [rows, k...] (contracting its trailing dimensions) and ``rhs`` as matrices
    [rows, K] and [K, N]; the result's shape; and the order of ``rhs``'s dimensions in the
    [K, N] matrix (contracted first)."""
    (_, rhs_contract), _ = dimension_numbers
    order = (*rhs_contract, *(d for d in range(rhs.ndim) if d not in rhs_contract))
    w = jnp.transpose(rhs, order)
    rows = lhs.shape[0]
    return (lhs.reshape(rows, -1), w.reshape(math.prod(w.shape[:len(rhs_contract)]), -1),
            (rows, *w.shape[len(rhs_contract):]), order)


def _transposed(x: jax.Array) -> jax.Array:
    """``x.T`` of a [rows, k] matrix, written out. XLA folds a plain transpose into the
    product that reads it, as a product over the operand's first dimension, which XLA:CPU
    does not give its matrix library in bfloat16 (it runs it in float32); reached through
    a reshape, the transpose stays a copy of its own and the product takes it as it is.
    Where both sides divide by 16, by 16 x 16 tiles (each tile transposed, then the tiles
    moved), which XLA copies 1-5% faster within a step than the one transpose."""
    rows, k = x.shape
    if rows % 16 == 0 and k % 16 == 0:
        tiles = jnp.transpose(x.reshape(rows // 16, 16, k // 16, 16), (0, 2, 3, 1))
        return jnp.transpose(tiles, (1, 2, 0, 3)).reshape(k, rows)
    split = math.gcd(rows, 8)
    return jnp.transpose(x.reshape(split, rows // split, k), (2, 0, 1)).reshape(k, rows)


def _rounded(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rounded_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
    x, w, shape, _ = _matrices(lhs, rhs, dimension_numbers)
    return _rounded(x, w, lhs.dtype).reshape(shape)


def _rounded_dot_fwd(lhs, rhs, dimension_numbers):
    return _rounded_dot(lhs, rhs, dimension_numbers), (lhs, rhs)


def _rounded_dot_bwd(dimension_numbers, residuals, g):
    """dx = g w^T and dw = x^T g, each with its transposed operand written out first."""
    lhs, rhs = residuals
    x, w, _, order = _matrices(lhs, rhs, dimension_numbers)
    g = g.astype(lhs.dtype).reshape(x.shape[0], -1)
    dx = _rounded(g, _transposed(w), lhs.dtype).reshape(lhs.shape)
    dw = _rounded(_transposed(x), g, rhs.dtype).reshape([rhs.shape[d] for d in order])
    return dx, jnp.transpose(dw, tuple(order.index(d) for d in range(rhs.ndim)))


_rounded_dot.defvjp(_rounded_dot_fwd, _rounded_dot_bwd)


def compute_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                        preferred_element_type=None) -> jax.Array:
    """``lax.dot_general`` of compute-dtype operands, as the dense layers call it.

    On XLA:CPU, a bfloat16 product of a matrix of rows ([rows, k...], contracting its
    trailing dimensions, as ``rows_dot`` gives it) and a weight is computed accumulated in
    float32 and rounded to bfloat16 after, and so is each product of its gradient, with
    the operands laid out as XLA:CPU's matrix library (YNNPACK) takes them in bfloat16:
    the left operand contracting its last dimension, the right its first. Those products
    run on the CPU's bfloat16 matrix units where it has them (AMX) at 3-5x its float32 speed;
    XLA:CPU runs a bfloat16 product with a bfloat16 result, or one whose left operand
    contracts its first dimension (a weight's gradient), at float32 speed or below
    (docs/performance.md). Elsewhere, and for other products, ``lax.dot_general``."""
    (lhs_contract, _), batch = dimension_numbers
    rows_matrix = lhs.ndim >= 2 and sorted(lhs_contract) == list(range(1, lhs.ndim)) and not any(batch)
    if (jax.default_backend() == "cpu" and preferred_element_type is None and rows_matrix
            and lhs.dtype == rhs.dtype == jnp.bfloat16):
        return _rounded_dot(lhs, rhs, dimension_numbers)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _float32_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _float32_dot_fwd(lhs, rhs, dimension_numbers):
    return _float32_dot(lhs, rhs, dimension_numbers), (lhs, rhs)


def _float32_dot_bwd(dimension_numbers, residuals, g):
    lhs, rhs = residuals
    _, vjp = jax.vjp(lambda a, b: compute_dot_general(a, b, dimension_numbers), lhs, rhs)
    return vjp(g.astype(jnp.result_type(lhs, rhs)))


_float32_dot.defvjp(_float32_dot_fwd, _float32_dot_bwd)


def float32_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                        preferred_element_type=None) -> jax.Array:
    """``lax.dot_general`` of compute-dtype operands, accumulated in and returned as float32,
    whose gradients are products in the operands' dtype: the float32 cotangent is rounded
    to it first (bfloat16 under ``model.dtype=bfloat16``, as every other matmul's backward).
    Left to JAX, the float32 cotangent would upcast the other operand and run the two
    backward products of the vocabulary projection, the largest matmuls of a small model,
    at float32 speed. With float32 operands it is exactly ``lax.dot_general``."""
    del precision, preferred_element_type  # always the default precision, always float32 out
    return _float32_dot(lhs, rhs, dimension_numbers)


def sum_last_axis(x: jax.Array) -> jax.Array:
    """``jnp.sum(x, axis=-1)`` of a float32 array. On XLA:CPU, by a product with a vector
    of ones (at full float32 precision): XLA:CPU hands a reduction over the last axis to
    YNNPACK, which ran such sums at a small fraction of memory speed (the attention
    gradient's row sums of dO * O over [4, 12, 512, 64]: 11.5 ms, 0.3 ms as a product;
    the loss's over [2048, 50304]: a third of the speed of XLA's own loop;
    docs/performance.md). Elsewhere, the reduction."""
    if jax.default_backend() != "cpu":
        return jnp.sum(x, axis=-1)
    return jnp.matmul(x, jnp.ones(x.shape[-1], x.dtype), precision=jax.lax.Precision.HIGHEST)


def gathered(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """A parameter ``x`` with logical axes ``axes`` constrained, where it is used, to the
    sharding it has without its ``embed`` split (the ``fsdp`` mesh axis): XLA gathers the
    parameter (in the compute dtype, when cast first) before the product and
    reduce-scatters its gradient after, as FSDP means to. Left free, XLA may instead move
    the activations, which are larger."""
    return constrain(x, tuple(None if a == "embed" else a for a in axes))


def rows_dot(dot, lhs: jax.Array, rhs: jax.Array, dimension_numbers, **kwargs) -> jax.Array:
    """``dot(lhs, rhs, dimension_numbers, **kwargs)`` with the leading, free dimensions of
    ``lhs`` (batch and sequence) merged into one rows dimension first, where ``lhs``
    contracts only its trailing dimensions and there are no batch dimensions; the result
    has the same shape. A weight's gradient then contracts one dimension of rows rather
    than two, which XLA:CPU's matmuls take transposed as they are; with two it copied the
    cotangent into a transposed layout first (for the vocabulary projection, a
    [vocab, tokens] float32 copy each step)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    free = lhs.ndim - len(lhs_contract)
    if lhs_batch or rhs_batch or free < 2 or sorted(lhs_contract) != list(range(free, lhs.ndim)):
        return dot(lhs, rhs, dimension_numbers, **kwargs)
    rows = lhs.reshape(-1, *lhs.shape[free:])
    out = dot(rows, rhs, ((tuple(c - free + 1 for c in lhs_contract), tuple(rhs_contract)), ((), ())), **kwargs)
    return out.reshape(*lhs.shape[:free], *out.shape[1:])


def _kernel_dot(kernel_axes: tuple, accumulate_float32: bool, lhs, rhs, dimension_numbers, precision=None,
                preferred_element_type=None):
    """DenseGeneral's product, its kernel (``rhs``) gathered over ``fsdp`` first."""
    rhs = gathered(rhs, kernel_axes)
    if accumulate_float32:
        return rows_dot(float32_dot_general, lhs, rhs, dimension_numbers)
    return rows_dot(compute_dot_general, lhs, rhs, dimension_numbers, precision=precision,
                    preferred_element_type=preferred_element_type)


def dense(
    cfg: ModelConfig,
    features: int | Sequence[int],
    kernel_axes: Sequence[str],
    *,
    axis: int | Sequence[int] = -1,
    std: float | None = None,
    use_bias: bool | None = None,
    accumulate_float32: bool = False,
    name: str | None = None,
) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel (and bias) carry logical axis names.

    Args:
      cfg: model config (dtype, bias default, init scale).
      features: output feature shape.
      kernel_axes: logical names of the kernel dimensions, inputs first.
      axis: input axes contracted.
      std: normal init standard deviation (default ``cfg.init_std``).
      use_bias: overrides ``cfg.use_bias``.
      accumulate_float32: accumulate in and return float32 (the compute dtype otherwise).
      name: module name.
    """
    num_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=cfg.use_bias if use_bias is None else use_bias,
        dtype=compute_dtype(cfg),
        param_dtype=jnp.float32,
        kernel_init=logical(nn.initializers.normal(cfg.init_std if std is None else std), kernel_axes),
        bias_init=logical(nn.initializers.zeros, kernel_axes[-num_out:]),
        dot_general=functools.partial(_kernel_dot, tuple(kernel_axes), accumulate_float32),
        name=name,
    )


def norm(cfg: ModelConfig, name: str) -> nn.Module:
    """LayerNorm or RMSNorm by config; statistics are computed in float32."""
    scale_init = logical(nn.initializers.ones, ("norm",))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(
            epsilon=cfg.norm_eps, dtype=compute_dtype(cfg), param_dtype=jnp.float32, scale_init=scale_init, name=name
        )
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        use_bias=cfg.use_bias,
        dtype=compute_dtype(cfg),
        param_dtype=jnp.float32,
        scale_init=scale_init,
        bias_init=logical(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (tanh approximation as GPT-2, or exact as BERT),
    ReLU (the original Transformer, T5 1.0), or gated: SwiGLU (Llama) or GEGLU (T5 1.1:
    tanh-approximate GELU of ``gate`` times ``up``)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.mlp in ("swiglu", "geglu"):
            gate = dense(cfg, cfg.d_ff, ("embed", "mlp"), name="gate")(x)
            up = dense(cfg, cfg.d_ff, ("embed", "mlp"), name="up")(x)
            h = (nn.silu(gate) if cfg.mlp == "swiglu" else nn.gelu(gate, approximate=True)) * up
        elif cfg.mlp == "relu":
            h = nn.relu(dense(cfg, cfg.d_ff, ("embed", "mlp"), name="up")(x))
        else:
            h = nn.gelu(dense(cfg, cfg.d_ff, ("embed", "mlp"), name="up")(x), approximate=cfg.mlp == "gelu")
        h = constrain(h, ("batch", "length", "act_mlp"))  # [batch, seq, d_ff]
        return dense(cfg, cfg.d_model, ("mlp", "embed"), std=residual_init_std(cfg), name="down")(h)


# Tables of at most this many rows are looked up by a one-hot product (``Embed``).
ONE_HOT_ROWS = 16


def row_gradients_by_sorting() -> bool:
    """Whether ``Embed`` takes its table's gradient by sorting (``take_rows``): on a GPU,
    where the gather's own gradient, a scatter-add, serializes the atomic adds of every
    token of a frequent id into one row. (On a CPU the scatter is a loop, and stays.)"""
    return jax.default_backend() == "gpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def take_rows(table: jax.Array, ids: jax.Array, rows: int) -> jax.Array:
    """``table[ids]`` (``jnp.take`` along rows) whose gradient sorts each batch row's ids,
    sums each id's run of cotangents by a segmented scan in float32, and adds one sum per
    id and batch row into the table. The same sums as the scatter-add that differentiates
    a gather, with a row of the table receiving at most one add per batch row instead of
    one per token (a row of BERT's [MASK], 12% of the tokens, cost 63 ms of a 157 ms step
    on an H200 as ~3,900 atomic adds). Sorting within batch rows keeps the work where the
    batch is sharded. ``rows``: the table's row count."""
    return jnp.take(table, ids, axis=0)


def _take_rows_forward(table, ids, rows):
    return jnp.take(table, ids, axis=0), (ids, jnp.zeros((0, table.shape[1]), table.dtype))


def _take_rows_backward(rows, residuals, cotangent):
    ids, like = residuals
    by_row = ids.reshape(ids.shape[0], -1) if ids.ndim >= 2 else ids.reshape(1, -1)  # [batch, tokens]
    grads = cotangent.reshape(*by_row.shape, -1).astype(jnp.float32)
    order = jnp.argsort(by_row, axis=1)
    sorted_ids = jnp.take_along_axis(by_row, order, axis=1)
    grads = jnp.take_along_axis(grads, order[..., None], axis=1)

    def combine(a, b):  # a run's sum so far; associative because equal ids are contiguous
        (id_a, sum_a), (id_b, sum_b) = a, b
        return id_b, jnp.where((id_a == id_b)[..., None], sum_a + sum_b, sum_b)

    _, sums = jax.lax.associative_scan(combine, (sorted_ids, grads), axis=1)
    last = jnp.concatenate([sorted_ids[:, 1:] != sorted_ids[:, :-1], jnp.ones_like(sorted_ids[:, :1], jnp.bool_)],
                           axis=1)
    target = jnp.where(last, sorted_ids, rows).reshape(-1)  # each id's run total, at the run's last entry
    d_table = jnp.zeros((rows, grads.shape[-1]), jnp.float32).at[target].add(sums.reshape(target.shape[0], -1),
                                                                              mode="drop")
    return d_table.astype(like.dtype), None


take_rows.defvjp(_take_rows_forward, _take_rows_backward)


class Embed(nn.Embed):
    """``nn.Embed`` (the same parameter and lookup) with gradients that suit the table:
    a table of at most ``ONE_HOT_ROWS`` rows (BERT's token types) is looked up as one-hot
    rows times the table, exactly (each output is one row times one), so its gradient is
    a matmul, not every token added into a few rows; larger tables take their gradient by
    sorting (``take_rows``) where ``row_gradients_by_sorting``."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"embedding lookups take integer ids, got {inputs.dtype}")
        dtype = self.dtype or self.param_dtype
        table = jnp.asarray(self.embedding, dtype)
        if self.num_embeddings <= ONE_HOT_ROWS:
            return jnp.einsum("...n,nd->...d", jax.nn.one_hot(inputs, self.num_embeddings, dtype=dtype), table)
        if row_gradients_by_sorting():
            return take_rows(table, inputs, self.num_embeddings)
        return jnp.take(table, inputs, axis=0)


def embedding(cfg: ModelConfig, num: int, axes: tuple[str, str], name: str) -> nn.Embed:
    """A [num, d_model] embedding table with logical axis names ``axes`` (``Embed``)."""
    return Embed(
        num,
        cfg.d_model,
        embedding_init=logical(nn.initializers.normal(cfg.init_std), axes),
        dtype=compute_dtype(cfg),
        param_dtype=jnp.float32,
        name=name,
    )


def input_embeddings(cfg: ModelConfig, tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, nn.Embed]:
    """Token embeddings plus learned position embeddings (with ``position: learned``)
    [batch, seq, d_model], and the token table (for a tied output). Call inside a compact
    module: it owns the ``embed`` and ``pos_embed`` tables."""
    embed = embedding(cfg, cfg.vocab_size, ("vocab", "embed"), "embed")
    x = embed(tokens)
    if cfg.position == "learned":
        x = x + embedding(cfg, cfg.max_seq_len, ("position", "embed"), "pos_embed")(positions)
    return x, embed


@flax.struct.dataclass
class VocabLogits:
    """Vocabulary logits not yet computed: the states and the projection that make them.

    ``logits()`` computes them all, [batch, seq, vocab] float32;
    ``t2x.objectives.chunked_lm_loss`` computes them a chunk of positions at a time.

    Attributes:
      hidden: [batch, seq, d_model] states, in the compute dtype.
      weight: the projection in the compute dtype, gathered: the token table [vocab,
        d_model] (``vocab_axis`` 0) or an untied head's kernel [d_model, vocab] (1).
      bias: [vocab] float32, added to the logits, or None.
    """

    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None = None
    vocab_axis: int = flax.struct.field(pytree_node=False, default=0)

    def logits(self) -> jax.Array:
        """float32 [batch, seq, vocab], the product accumulated in float32 (its backward
        products in the compute dtype: ``float32_dot_general``)."""
        contract = (self.hidden.ndim - 1,), (1 - self.vocab_axis,)
        logits = rows_dot(float32_dot_general, self.hidden, self.weight, (contract, ((), ())))
        if self.bias is not None:
            logits = logits + self.bias
        return constrain(logits, ("batch", "length", "act_vocab"))


class VocabHead(nn.Module):
    """An untied output projection: ``kernel`` [d_model, vocab], float32, normal init of
    ``init_std`` (the parameter a bias-free ``dense`` would have). Returns ``VocabLogits``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> VocabLogits:
        cfg = self.cfg
        kernel = self.param("kernel", logical(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
                            (x.shape[-1], cfg.vocab_size), jnp.float32)
        dtype = compute_dtype(cfg)
        return VocabLogits(x.astype(dtype), gathered(kernel.astype(dtype), ("embed", "vocab")), vocab_axis=1)


def output_logits(cfg: ModelConfig, x: jax.Array, embed: nn.Embed, deferred: bool = False) -> jax.Array | VocabLogits:
    """Vocabulary logits of hidden states ``x`` [batch, seq, d_model]: through the token
    embedding table (tied) or an ``lm_head`` (``VocabHead``) of the calling module.

    The projection multiplies compute-dtype operands but accumulates and returns float32:
    logits are never rounded to bfloat16 before the softmax; its backward products run in
    the compute dtype (``float32_dot_general``). With ``deferred``, the ``VocabLogits``
    that make them instead.
    """
    if cfg.tie_embeddings:
        projection = VocabLogits(x, gathered(embed.embedding.astype(x.dtype), ("vocab", "embed")))  # [vocab, d_model]
    else:
        projection = VocabHead(cfg, name="lm_head")(x)
    return projection if deferred else projection.logits()


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, rotate-half layout (as GPT-NeoX and Llama).

    Args:
      x: [batch, seq, heads, head_dim].
      positions: [batch, seq] integer positions.
      theta: base of the frequencies.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
