"""Position information of encoder-decoders: T5's relative position bias and the original
Transformer's fixed sinusoids. (Learned and rotary positions live in ``layers``.)"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.layers import logical


def relative_position_bucket(relative: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket of each relative position ``key - query`` (Mesh TensorFlow's formula).

    Half the buckets (of each direction, when ``bidirectional``) hold distances 0, 1, 2, ...
    exactly; the rest grow logarithmically up to ``max_distance``, past which all
    distances share the last bucket. Unidirectional (causal) attention has only keys at
    or before the query, so every bucket serves the past.

    Args:
      relative: integer array of key position minus query position.
      bidirectional: keys on both sides (the encoder) or only before (the decoder).
      num_buckets: buckets in all.
      max_distance: distances from this on share the last bucket.

    Returns:
      int32 buckets in [0, num_buckets), shaped as ``relative``.
    """
    bucket = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    # float32 as Mesh TensorFlow and transformers compute it, so the buckets agree exactly.
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = jnp.minimum(max_exact + (scaled * (num_buckets - max_exact)).astype(relative.dtype), num_buckets - 1)
    return (bucket + jnp.where(distance < max_exact, distance, large)).astype(jnp.int32)


class RelativePositionBias(nn.Module):
    """A learned [buckets, heads] table of attention-logit biases by relative position,
    one per stack and shared by its layers (T5)."""

    cfg: ModelConfig
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """The bias [batch, heads, q_len, kv_len] (float32) of queries at
        ``query_positions`` [batch, q_len] attending keys at ``key_positions`` [batch, kv_len]."""
        cfg = self.cfg
        table = self.param(
            "embedding",
            logical(nn.initializers.normal(cfg.init_std), ("relative_buckets", "heads")),
            (cfg.relative_buckets, cfg.num_heads),
            jnp.float32,
        )
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # [batch, q_len, kv_len]
        buckets = relative_position_bucket(relative, self.bidirectional, cfg.relative_buckets,
                                           cfg.relative_max_distance)
        return jnp.transpose(table[buckets], (0, 3, 1, 2))  # [batch, heads, q_len, kv_len]


def sinusoidal_positions(positions: jax.Array, d_model: int) -> jax.Array:
    """The original Transformer's fixed encoding [batch, seq, d_model] (float32) of
    ``positions`` [batch, seq]: sin(p / 10000^(2i/d)) in feature 2i, cos in 2i+1."""
    half = (d_model + 1) // 2
    inv_freq = 10000.0 ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / d_model)  # [half]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, half]
    interleaved = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [batch, seq, half, 2]
    return interleaved.reshape(*positions.shape, 2 * half)[..., :d_model]
