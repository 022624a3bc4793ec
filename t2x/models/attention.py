"""Multi-head and grouped-query attention through ``jax.nn.dot_product_attention``."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.layers import apply_rope, constrain, dense, residual_init_std, sum_last_axis


def attention_mask(segment_ids: jax.Array | None, seq_len: int, causal: bool = True) -> jax.Array:
    """Boolean mask [batch or 1, 1, q_len, kv_len]: True where a query may attend a key.

    Tokens attend only within their own segment (packed documents never see each other)
    and, when ``causal``, only to earlier positions. Padding has segment id 0 and attends
    only to padding, which keeps every softmax row non-empty.
    """
    mask = jnp.ones((1, 1, seq_len, seq_len), dtype=jnp.bool_)
    if causal:
        mask = jnp.tril(mask)
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        mask = mask & same
    return mask


CAUSAL_BLOCK = 64  # query rows per block of blocked_attention (the smallest: see causal_block)
PACKED_SEGMENTS = 8  # runs of a row that cuDNN's packed attention is given room for


def _on_cuda() -> bool:
    """The default backend is an NVIDIA GPU (CUDA, where cuDNN is)."""
    if jax.default_backend() != "gpu":
        return False
    try:
        return "cuda" in jax.extend.backend.get_backend().platform_version.lower()
    except Exception:  # noqa: BLE001 - a backend that cannot say is not taken for CUDA
        return False


def causal_block(seq_len: int) -> int:
    """Query rows per block of ``blocked_attention`` over ``seq_len`` tokens: 128
    from 512 tokens on (when it divides them), else ``CAUSAL_BLOCK``. Larger blocks mean
    fewer, larger products but more of the hidden half computed; on a CPU, 128 was the
    faster train step at 512 tokens and 64 at 256 (docs/performance.md)."""
    wide = 2 * CAUSAL_BLOCK
    return wide if seq_len >= 512 and seq_len % wide == 0 else CAUSAL_BLOCK


def self_attention_kernel(cfg: ModelConfig, seq_len: int, has_bias: bool, causal: bool,
                          backend: str | None = None) -> str:
    """How self-attention over ``seq_len`` tokens is computed in training and evaluation:

    - ``cudnn``: cuDNN's fused (flash) attention, packed segments passed to it as such and
      the causal mask as its mask type, so it skips the blocks the mask hides. Chosen by
      ``model.attention = cudnn``, or by auto on an NVIDIA GPU for bfloat16 with head
      dimensions cuDNN takes (a multiple of 8, at most 128) and no logit bias.
    - ``xla_blocks``: XLA by blocks of ``causal_block(seq_len)`` queries (``blocked_attention``),
      with its written-out gradient: where XLA computes attention on a CPU; causal
      attention with at least two whole blocks, skipping the keys after each block, and
      bidirectional attention (with T5's relative bias too).
    - ``xla``: XLA's dense computation under the boolean mask.

    ``backend``: the platform deciding ``auto`` (default: JAX's default backend, with
    ``gpu`` meaning CUDA)."""
    if backend is None:
        backend = "gpu" if _on_cuda() else jax.default_backend()
    if cfg.attention == "cudnn":
        return "cudnn"
    if cfg.attention == "auto" and backend == "gpu":
        fits = cfg.head_size % 8 == 0 and cfg.head_size <= 128
        if cfg.dtype in ("bfloat16", "float16") and fits and not has_bias:
            return "cudnn"
    on_cpu_xla = cfg.attention == "xla" or (cfg.attention == "auto" and backend == "cpu")
    if on_cpu_xla and (not causal or (seq_len % CAUSAL_BLOCK == 0 and seq_len >= 2 * CAUSAL_BLOCK)):
        return "xla_blocks"
    return "xla"


def packed_segments(segment_ids: jax.Array, max_segments: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cuDNN's description of packed rows: (lengths [batch, M], offsets [batch, M + 1]) of
    each run of equal segment ids in ``segment_ids`` [batch, seq], in order, with -1 past a
    row's last run. A row's padding (segment 0, at its end) is a run of its own: padding
    attends padding, as under ``attention_mask``, so every output is defined. ``M``
    (``max_segments``, default ``seq``) bounds the runs of a row; a row with more than
    ``M`` runs has its last ones left out, so the default never loses one."""
    batch, seq_len = segment_ids.shape
    m = seq_len if max_segments is None else min(max_segments, seq_len)
    starts = jnp.concatenate([jnp.ones((batch, 1), jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    runs = jnp.sum(starts, axis=1, keepdims=True)
    position = jnp.arange(seq_len, dtype=jnp.int32)
    first = jnp.sort(jnp.where(starts, position, seq_len), axis=1)[:, :m]  # run starts, then seq_len
    ends = jnp.concatenate([first[:, 1:], jnp.full((batch, 1), seq_len, jnp.int32)], axis=1)
    used = jnp.arange(m)[None, :] < runs
    lengths = jnp.where(used, ends - first, -1).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.where(used, first, -1), jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    return lengths, offsets.astype(jnp.int32)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, causal: bool,
                    scale: float, bias: jax.Array | None = None, mask: jax.Array | None = None,
                    max_segments: int | None = None) -> jax.Array:
    """cuDNN's fused attention of ``q`` [batch, q_len, heads, head_dim] over ``k``/``v``.

    Self-attention of packed rows (``segment_ids`` [batch, seq], no ``bias``) goes to cuDNN
    as its packed layout (``packed_segments``) under a padding mask type, causal or not,
    so masked blocks are skipped rather than computed and biased away. cuDNN's packed
    kernels cost in proportion to the runs they are given room for (``max_segments``, at
    most ``PACKED_SEGMENTS`` by default): a batch with a row of more runs than that goes
    the masked way instead (chosen on the device, each step), under ``mask`` when given
    (the segments' own, made once by the caller) or one made here. Otherwise ``mask``
    (None: none beyond ``causal``) and ``bias`` go through ``jax.nn.dot_product_attention``
    with ``is_causal``: cuDNN adds the mask to the logits as a bias."""
    if segment_ids is not None and bias is None:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn  # packing is not in jax.nn's API

        m = PACKED_SEGMENTS if max_segments is None else max_segments
        mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING

        def packed(q, k, v):
            lengths, offsets = packed_segments(segment_ids, m)
            return cudnn.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                               kv_offsets=offsets, scale=scale, mask_type=mask_type,
                                               qkv_layout="BTNH")

        def masked(q, k, v):
            dense = attention_mask(segment_ids, segment_ids.shape[1], causal=causal) if mask is None else mask
            return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, is_causal=causal,
                                                implementation="cudnn")

        starts = segment_ids[:, 1:] != segment_ids[:, :-1]
        fits = jnp.max(jnp.sum(starts, axis=1)) + 1 <= m
        return jax.lax.cond(fits, packed, masked, q, k, v)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal,
                                        implementation="cudnn")


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, bias: jax.Array | None,
                      scale: float | None, block: int | None = None, causal: bool = True) -> jax.Array:
    """``jax.nn.dot_product_attention``'s XLA computation under ``mask`` [batch or 1, 1,
    seq, seq], by blocks of ``block`` queries (default: ``causal_block`` of the row's
    length). With ``causal`` (a causal ``mask``) each block goes over the keys up to its
    last query: the keys after it are masked for every query of the block, so their
    scores, softmax and products (nearly half of the whole) are never computed; the
    result is the full computation's, the skipped keys' weights being exactly 0 there.
    Without, each block goes over every key.

    Queries, keys and values are laid out once as [batch, kv_heads, seq x group,
    head_dim] (a group's query heads side by side at each position), so that every
    block's products are plain batched matmuls over contiguous rows: per block in the
    [batch, seq, heads, head_dim] layout, XLA:CPU copied each block's keys and values
    into that layout again, and with the group as an axis of its own it ran the
    products 15-20% slower. The numerics are ``jax.nn.dot_product_attention``'s: float32
    logits, scaled, biased, masked to a large negative float32, softmax in float32,
    probabilities in the values' dtype.

    The gradient is written out (``_blocked_attention_bwd``) rather than derived by
    autodiff: with each row's dot product of output and output gradient computed once,
    the softmax's gradient is one element-wise pass per block, and the keys' and values'
    gradients accumulate block by block in place."""
    batch, seq_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    block = causal_block(seq_len) if block is None else block
    qt = q.reshape(batch, seq_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4).reshape(
        batch, kv_heads, seq_len * group, head_dim)  # [b, kv, seq x g, d]
    kt, vt = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [b, kv, seq, d]
    if bias is not None:  # [b or 1, heads, seq, seq] -> [b or 1, kv, seq x g, seq]
        bias = jnp.broadcast_to(bias, (bias.shape[0], heads, seq_len, bias.shape[-1]))
        bias = bias.reshape(bias.shape[0], kv_heads, group, seq_len, -1).transpose(0, 1, 3, 2, 4).reshape(
            bias.shape[0], kv_heads, seq_len * group, -1)
    out = _blocked_attention(qt, kt, vt, mask, bias, float(scale), block, group, causal)  # [b, kv, seq x g, d]
    return out.reshape(batch, kv_heads, seq_len, group, head_dim).transpose(0, 2, 1, 3, 4).reshape(
        batch, seq_len, heads, head_dim)


def _block_mask(mask, start, end, keys, group):
    """The mask's rows of queries ``start:end`` over keys ``:keys``, each row repeated for
    the ``group`` query heads of its position ([b or 1, 1, (end - start) x group, keys])."""
    m = mask[..., start:end, :keys]
    return jnp.repeat(m, group, axis=-2) if group > 1 else m


def _blocked_attention_fwd(q, k, v, mask, bias, scale, block, group, causal):
    """Each block's output and probabilities (float32): ``q`` [b, kv, seq x g, d], ``k`` and
    ``v`` [b, kv, seq, d], ``mask`` [b or 1, 1, seq, seq], ``bias`` [b or 1, kv, seq x g, seq]."""
    lowest = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)  # as jax.nn.dot_product_attention
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    seq_len = k.shape[2]
    outs, probs = [], []
    for start in range(0, seq_len, block):
        end = min(start + block, seq_len)
        keys = end if causal else seq_len
        rows = slice(start * group, end * group)
        logits = jnp.einsum("bkqd,bksd->bkqs", q[:, :, rows], k[:, :, :keys],
                            precision=precision, preferred_element_type=jnp.float32)
        logits = logits * jnp.float32(scale)
        if bias is not None:
            logits = (logits + bias[:, :, rows, :keys]).astype(jnp.float32)
        logits = jnp.where(_block_mask(mask, start, end, keys, group), logits, lowest)
        p = jax.nn.softmax(logits, axis=-1)
        probs.append(p)
        outs.append(jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v[:, :, :keys],
                               preferred_element_type=jnp.float32).astype(v.dtype))
    return jnp.concatenate(outs, axis=2), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blocked_attention(q, k, v, mask, bias, scale, block, group, causal):
    return _blocked_attention_fwd(q, k, v, mask, bias, scale, block, group, causal)[0]


def _blocked_attention_vjp_fwd(q, k, v, mask, bias, scale, block, group, causal):
    out, probs = _blocked_attention_fwd(q, k, v, mask, bias, scale, block, group, causal)
    return out, (q, k, v, mask, bias, out, probs)


def _blocked_attention_bwd(scale, block, group, causal, residuals, g):
    """Gradients of ``_blocked_attention`` from its saved probabilities: for a block's
    probabilities P and output gradient dO, dV += P^T dO, dP = dO V^T, and the logits'
    gradient dS = P (dP - rowsum(dO * O)), masked (what autodiff of the masked softmax
    gives); dQ = scale dS K, dK += scale dS^T Q, the bias's gradient dS."""
    q, k, v, mask, bias, out, probs = residuals
    f32 = jnp.float32
    seq_len = k.shape[2]
    delta = sum_last_axis(g.astype(f32) * out.astype(f32))[..., None]  # [b, kv, seq x g, 1]
    dq, dk, dv = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
    dbias = None if bias is None else jnp.zeros(bias.shape, f32)
    for i, start in enumerate(range(0, seq_len, block)):
        end = min(start + block, seq_len)
        keys = end if causal else seq_len
        rows = slice(start * group, end * group)
        p, gi = probs[i], g[:, :, rows]
        dv = dv.at[:, :, :keys].add(jnp.einsum("bkqs,bkqd->bksd", p.astype(v.dtype), gi, preferred_element_type=f32))
        dp = jnp.einsum("bkqd,bksd->bkqs", gi, v[:, :, :keys], preferred_element_type=f32)
        ds = jnp.where(_block_mask(mask, start, end, keys, group), p * (dp - delta[:, :, rows]), f32(0))
        if bias is not None:
            summed = tuple(a for a in range(ds.ndim) if bias.shape[a] == 1 and ds.shape[a] != 1)
            dbias = dbias.at[:, :, rows, :keys].set(jnp.sum(ds, axis=summed, keepdims=True))
        ds = (ds * f32(scale)).astype(q.dtype)
        dq.append(jnp.einsum("bkqs,bksd->bkqd", ds, k[:, :, :keys], preferred_element_type=f32))
        dk = dk.at[:, :, :keys].add(jnp.einsum("bkqs,bkqd->bksd", ds, q[:, :, rows], preferred_element_type=f32))
    dq = jnp.concatenate(dq, axis=2).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None if bias is None else dbias.astype(bias.dtype)


_blocked_attention.defvjp(_blocked_attention_vjp_fwd, _blocked_attention_bwd)


def cache_mask(positions: jax.Array, cache_len: int) -> jax.Array:
    """Boolean mask [batch, 1, q_len, cache_len] for queries reading a KV cache: a query
    at position p sees cache slots 0..p, which hold its row's tokens at those positions."""
    return jnp.arange(cache_len)[None, None, None, :] <= positions[:, None, :, None]


def write_cache(cache: jax.Array, layer, rows: jax.Array, positions: jax.Array, values: jax.Array) -> jax.Array:
    """The stacked ``cache`` [layers, cache rows, cache_len, heads, head_dim] with
    ``values`` [batch, q_len, heads, head_dim] written into ``layer`` at cache rows
    ``rows`` [batch] and slots ``positions`` [batch, q_len]; positions past the end are
    dropped. A scatter into the whole cache, which XLA does in place."""
    return cache.at[layer, rows[:, None], positions].set(values.astype(cache.dtype), mode="drop")


def read_cache(cache: jax.Array, layer, rows: jax.Array | None, window: int) -> jax.Array:
    """Slots ``0..window-1`` of ``layer`` of the stacked cache: of every cache row
    (``rows`` None), or of the rows ``rows`` [batch]."""
    if rows is None:
        start = (layer, *([0] * (cache.ndim - 1)))
        return jax.lax.dynamic_slice(cache, start, (1, cache.shape[1], window, *cache.shape[3:]))[0]
    return jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)[rows, :window]


def cross_attention_mask(decoder_segment_ids: jax.Array | None, encoder_segment_ids: jax.Array | None,
                         q_len: int) -> jax.Array | None:
    """Boolean mask [batch or 1, 1, q_len, enc_len] of decoder queries over encoder keys:
    a token of segment s attends the encoder tokens of segment s (its own input).

    Decoder padding (segment 0) attends every encoder token, so its softmax row is never
    empty (an encoder row may have no padding); its outputs are never used. With
    ``decoder_segment_ids`` None (decoding with a cache: one target per row) every query
    attends its row's non-padding encoder tokens. None without ``encoder_segment_ids``:
    every query attends every encoder token.
    """
    if encoder_segment_ids is None:
        return None
    if decoder_segment_ids is None:
        return jnp.broadcast_to((encoder_segment_ids > 0)[:, None, None, :],
                                (encoder_segment_ids.shape[0], 1, q_len, encoder_segment_ids.shape[1]))
    same = decoder_segment_ids[:, None, :, None] == encoder_segment_ids[:, None, None, :]
    return same | (decoder_segment_ids == 0)[:, None, :, None]


class Attention(nn.Module):
    """Self-attention with ``num_kv_heads`` key/value heads shared by groups of query heads,
    or, with ``cross``, attention from ``x`` to another sequence ``kv`` (an encoder's states).

    With a KV cache (``cache``: every layer's keys and values [layers, cache rows,
    cache_len, kv_heads, head_dim]), the keys and values of ``x`` are written into layer
    ``layer`` of it, at cache rows ``rows`` (default: row i of ``x`` is cache row i) and
    at their positions, and the queries attend over its first ``window`` slots (``mask``
    then comes from ``cache_mask``); the updated cache is returned with the output.
    Cross-attention keeps its keys and values in ``cache["cross_k"]``/``["cross_v"]``
    [layers, cache rows, enc_len, kv_heads, head_dim]: written from ``kv`` when given,
    read back when ``kv`` is None.

    ``bias`` [batch or 1, heads, q_len, kv_len] is added to the attention logits (T5's
    relative positions). ``segments`` [batch, seq]: the segment ids ``mask`` was made of
    (self-attention without a cache), for kernels that take packed rows as such
    (``self_attention_kernel``). With ``model.position = relative`` the logits are not scaled by
    1/sqrt(head_dim), as T5; the query's init is scaled instead, so a fresh model starts
    as one with scaled logits would.
    """

    cfg: ModelConfig
    window: int | None = None  # cache slots attended (default: all)
    cross: bool = False  # keys and values from ``kv``, not ``x``
    causal: bool = False  # the mask is causal (with segments): the kernel may skip the blocks it hides

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None, cache: dict | None = None,
                 layer=None, rows: jax.Array | None = None, kv: jax.Array | None = None,
                 bias: jax.Array | None = None, segments: jax.Array | None = None):
        cfg = self.cfg
        if self.cross and kv is None and cache is None:
            raise ValueError("cross-attention needs the encoder's states, or a cache holding their keys and values")
        heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_size
        t5 = cfg.position == "relative"
        q = dense(cfg, (heads, head_dim), ("embed", "heads", "head_dim"),
                  std=cfg.init_std / head_dim**0.5 if t5 else None, name="query")(x)
        if not self.cross:
            k = dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="key")(x)
            v = dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="value")(x)
        elif kv is not None:
            k = dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="key")(kv)
            v = dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="value")(kv)
        if cfg.position == "rope" and not self.cross:
            q = apply_rope(q, positions, cfg.rope_theta)
            k = apply_rope(k, positions, cfg.rope_theta)
        q = constrain(q, ("batch", "length", "act_heads", "head_dim"))  # [batch, seq, heads, head_dim]
        if cache is not None and self.cross:
            if kv is None:  # filled on an earlier step
                k, v = (read_cache(cache[n], layer, rows, cache[n].shape[2]).astype(q.dtype)
                        for n in ("cross_k", "cross_v"))
            else:
                written = jnp.arange(x.shape[0]) if rows is None else rows
                slots = jnp.broadcast_to(jnp.arange(kv.shape[1]), kv.shape[:2])
                cache = {**cache, "cross_k": write_cache(cache["cross_k"], layer, written, slots, k),
                         "cross_v": write_cache(cache["cross_v"], layer, written, slots, v)}
        k = constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))  # [batch, kv_len, kv_heads, head_dim]
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        if cache is not None and not self.cross:
            written = jnp.arange(x.shape[0]) if rows is None else rows
            cache = {**cache, "k": write_cache(cache["k"], layer, written, positions, k),
                     "v": write_cache(cache["v"], layer, written, positions, v)}
            window = self.window or cache["k"].shape[2]
            k, v = (constrain(read_cache(cache[n], layer, rows, window).astype(q.dtype),
                              ("batch", "length", "act_kv_heads", "head_dim")) for n in "kv")
        bias = None if bias is None else bias.astype(q.dtype)
        kernel = "xla"  # decoding with a cache reads a few queries against the cache: XLA
        if cache is None and not self.cross:
            kernel = self_attention_kernel(cfg, q.shape[1], bias is not None, self.causal)
        elif cache is None and cfg.attention == "cudnn":
            kernel = "cudnn"
        if kernel == "cudnn":
            given = mask if self.cross or segments is not None else None  # else only causal, or nothing
            out = cudnn_attention(q, k, v, None if self.cross else segments, self.causal and not self.cross,
                                  1.0 if t5 else head_dim**-0.5, bias, given)
        elif kernel == "xla_blocks":
            out = blocked_attention(q, k, v, mask, bias, scale=1.0 if t5 else None, causal=self.causal)
        else:
            out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0 if t5 else None,
                                               implementation="xla")
        out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
        out = dense(
            cfg,
            cfg.d_model,
            ("heads", "head_dim", "embed"),
            axis=(-2, -1),
            std=residual_init_std(cfg),
            name="out",
        )(out)
        return out if cache is None else (out, cache)
