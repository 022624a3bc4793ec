"""Multi-head and grouped-query attention through ``jax.nn.dot_product_attention``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.layers import apply_rope, constrain, dense, residual_init_std


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


def cache_mask(positions: jax.Array, cache_len: int) -> jax.Array:
    """Boolean mask [batch, 1, q_len, cache_len] for queries reading a KV cache: a query
    at position p sees cache slots 0..p, which hold its row's tokens at those positions."""
    return jnp.arange(cache_len)[None, None, None, :] <= positions[:, None, :, None]


def write_cache(cache: jax.Array, positions: jax.Array, values: jax.Array) -> jax.Array:
    """``cache`` [batch, cache_len, heads, head_dim] with ``values`` [batch, q_len, heads,
    head_dim] written at the slots ``positions`` [batch, q_len]; positions past the end
    are dropped."""
    return jax.vmap(lambda c, p, v: c.at[p].set(v.astype(c.dtype), mode="drop"))(cache, positions, values)


class Attention(nn.Module):
    """Self-attention with ``num_kv_heads`` key/value heads shared by groups of query heads.

    With a KV cache (``cache``: keys and values [batch, cache_len, kv_heads, head_dim]),
    the keys and values of ``x`` are written into it at their positions and the queries
    attend over the whole cache (``mask`` then comes from ``cache_mask``); the updated
    cache is returned with the output.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: dict | None = None):
        cfg = self.cfg
        heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_size
        q = dense(cfg, (heads, head_dim), ("embed", "heads", "head_dim"), name="query")(x)
        k = dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="key")(x)
        v = dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="value")(x)
        if cfg.position == "rope":
            q = apply_rope(q, positions, cfg.rope_theta)
            k = apply_rope(k, positions, cfg.rope_theta)
        q = constrain(q, ("batch", "length", "act_heads", "head_dim"))  # [batch, seq, heads, head_dim]
        k = constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        if cache is not None:
            cache = {"k": write_cache(cache["k"], positions, k), "v": write_cache(cache["v"], positions, v)}
            k, v = (constrain(cache[n].astype(q.dtype), ("batch", "length", "act_kv_heads", "head_dim")) for n in "kv")
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation=None if cfg.attention == "auto" else cfg.attention
        )
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
