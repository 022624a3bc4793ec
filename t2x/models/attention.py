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


class Attention(nn.Module):
    """Self-attention with ``num_kv_heads`` key/value heads shared by groups of query heads."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
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
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation=None if cfg.attention == "auto" else cfg.attention
        )
        out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
        return dense(
            cfg,
            cfg.d_model,
            ("heads", "head_dim", "embed"),
            axis=(-2, -1),
            std=residual_init_std(cfg),
            name="out",
        )(out)
