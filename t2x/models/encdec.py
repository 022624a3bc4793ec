"""T5-style encoder-decoder (and the original Transformer): a bidirectional encoder, a
causal decoder cross-attending to it, one token embedding shared by both."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.attention import attention_mask, cache_mask, cross_attention_mask
from t2x.models.layers import VocabHead, VocabLogits, compute_dtype, constrain, embedding, norm, output_logits
from t2x.models.positions import RelativePositionBias, sinusoidal_positions
from t2x.models.transformer import BlockStack


def _default_positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def add_positions(cfg: ModelConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Token embeddings ``x`` [batch, seq, d_model] with absolute positions added:
    learned (a ``pos_embed`` table of the calling compact module) or the fixed sinusoids,
    the embeddings then scaled by sqrt(d_model) as the original Transformer did. Relative
    and rotary positions act inside attention instead."""
    if cfg.position == "learned":
        return x + embedding(cfg, cfg.max_seq_len, ("position", "embed"), "pos_embed")(positions)
    if cfg.position == "sinusoidal":
        return x * cfg.d_model**0.5 + sinusoidal_positions(positions, cfg.d_model).astype(x.dtype)
    return x


class Encoder(nn.Module):
    """Positions, bidirectional blocks within segments, final norm (pre-norm)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 deterministic: bool = True) -> jax.Array:
        """Output states [batch, seq, d_model] of the embedded tokens ``x``."""
        cfg = self.cfg
        dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
        x = constrain(dropout(add_positions(cfg, x, positions)), ("batch", "length", "act_embed"))
        mask = attention_mask(segment_ids, x.shape[1], causal=False)
        bias = None
        if cfg.position == "relative":
            bias = RelativePositionBias(cfg, bidirectional=True, name="relative_bias")(positions, positions)
        x = BlockStack(cfg, deterministic, name="blocks")(x, positions, mask, bias=bias, segments=segment_ids)
        if cfg.norm_position == "pre":  # post-norm blocks end normed
            x = dropout(norm(cfg, "final_norm")(x))
        return x


class Decoder(nn.Module):
    """Positions, causal blocks within segments that also attend to the encoder, final
    norm (pre-norm). Returns hidden states; ``EncoderDecoder`` projects them."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 encoded: jax.Array | None, encoder_segment_ids: jax.Array | None, deterministic: bool = True,
                 cache: dict | None = None, rows: jax.Array | None = None, window: int | None = None):
        """States [batch, seq, d_model] (with a cache, and the updated cache); arguments as
        ``EncoderDecoder.decode``."""
        cfg = self.cfg
        batch, q_len = x.shape[:2]
        dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
        x = constrain(dropout(add_positions(cfg, x, positions)), ("batch", "length", "act_embed"))
        if cache is None:
            mask = attention_mask(segment_ids, q_len, causal=True)
            key_positions = positions
        else:
            width = window or cache["k"].shape[2]
            mask = cache_mask(positions, width)
            # a cache slot holds the token at that position
            key_positions = jnp.broadcast_to(jnp.arange(width, dtype=positions.dtype), (batch, width))
        cross_mask = cross_attention_mask(segment_ids if cache is None else None, encoder_segment_ids, q_len)
        bias = None
        if cfg.position == "relative":
            bias = RelativePositionBias(cfg, bidirectional=False, name="relative_bias")(positions, key_positions)
        out = BlockStack(cfg, deterministic, window, cfg.decoder_layers, cross=True, causal=True, name="blocks")(
            x, positions, mask, cache, rows, encoded, cross_mask, bias, None if cache is not None else segment_ids)
        x, cache = (out, None) if cache is None else out
        if cfg.norm_position == "pre":
            x = dropout(norm(cfg, "final_norm")(x))
        return x if cache is None else (x, cache)


class EncoderDecoder(nn.Module):
    """An encoder and a decoder sharing one token embedding (``embed``), and the output
    projection: through that table with ``model.tie_embeddings``, else ``lm_head``.

    ``model.position`` picks the conventions: ``relative`` is T5 (relative position
    biases in self-attention, one table per stack; attention logits not scaled by
    1/sqrt(head_dim); with tied embeddings, decoder states scaled by d_model**-0.5 before
    the projection); ``sinusoidal`` is the original Transformer (fixed sinusoids added to
    embeddings scaled by sqrt(d_model)); ``learned`` and ``rope`` as the decoder family.

    Decoding with a cache (``decode``): the cache is ``init_cache``'s dict, every decoder
    layer stacked on the leading axis. ``k``/``v`` [layers, rows, cache_len, kv_heads,
    head_dim] hold self-attention keys and values at each token's position, as
    ``DecoderLM``'s cache; ``cross_k``/``cross_v`` [layers, rows, enc_len, kv_heads,
    head_dim] hold the cross-attention keys and values of the row's encoder states,
    written on the step that passes ``encoded`` and read on the steps after. They are
    cached rather than recomputed because recomputing them costs every step the
    projection of all enc_len encoder states in every layer, hundreds of times the rest
    of a one-token step.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = embedding(cfg, cfg.vocab_size, ("vocab", "embed"), None)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = VocabHead(cfg)

    def __call__(
        self,
        encoder_tokens: jax.Array,
        decoder_tokens: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        deferred: bool = False,
    ) -> jax.Array | VocabLogits:
        """Teacher-forced next-token logits of the decoder.

        Args:
          encoder_tokens: [batch, enc_seq] input token ids.
          decoder_tokens: [batch, dec_seq] decoder input ids (the targets shifted right);
            default ``encoder_tokens``, so ``init(rng, tokens)`` builds the model as for
            every family.
          encoder_positions, decoder_positions: [batch, seq] position of each token within
            its segment (default 0..seq-1).
          encoder_segment_ids, decoder_segment_ids: [batch, seq] packed pair ids, 0 for
            padding; decoder segment s attends encoder segment s (default: one pair).
          deterministic: disables dropout.
          deferred: return the ``VocabLogits`` that make the logits instead (for a loss
            that computes them a chunk at a time).

        Returns:
          float32 logits [batch, dec_seq, vocab_size] (``VocabLogits`` with ``deferred``).
        """
        encoded = self.encode(encoder_tokens, encoder_positions, encoder_segment_ids, deterministic)
        return self.decode(encoder_tokens if decoder_tokens is None else decoder_tokens, encoded, encoder_segment_ids,
                           decoder_positions, decoder_segment_ids, deterministic, deferred=deferred)

    def encode(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
        """The encoder's output states [batch, enc_seq, d_model] (compute dtype); arguments
        as the encoder's of ``__call__``."""
        return self.encoder(self.embed(tokens), _default_positions(tokens, positions), segment_ids, deterministic)

    def decode(
        self,
        tokens: jax.Array,
        encoded: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        cache: dict | None = None,
        rows: jax.Array | None = None,
        window: int | None = None,
        last: jax.Array | None = None,
        deferred: bool = False,
    ):
        """Next-token logits of decoder ``tokens`` given the encoder's states.

        Args:
          tokens: [batch, seq] decoder input ids.
          encoded: [batch, enc_seq, d_model] ``encode``'s states, row i for row i of
            ``tokens``. With a cache: given on the first step (their cross-attention keys
            and values are written into cache rows ``rows``), None on later steps (read back).
          encoder_segment_ids: [batch, enc_seq] the encoder rows' segment ids (0: padding),
            on every step; None: no padding.
          positions: [batch, seq] position of each token (default 0..seq-1).
          segment_ids: [batch, seq] decoder segment ids (without a cache; with one, each
            row is one target and the ids do not apply).
          deterministic: disables dropout.
          cache: ``init_cache``'s dict (see the class docstring). Each token's keys and
            values are written at its position of its cache row, and it attends to that
            row's slots up to its position.
          rows: [batch] the cache row of each row of ``tokens`` (default: the same index;
            the batch is then the cache's).
          window: with a cache, attend over its first ``window`` self-attention slots only
            (a static size above every position of ``tokens``). Default: all.
          last: [batch] index of the one position per row whose logits are computed.
          deferred: return the ``VocabLogits`` that make the logits instead.

        Returns:
          float32 logits [batch, seq (1 with ``last``), vocab_size] (``VocabLogits`` with
          ``deferred``); with a cache, (logits, the updated cache).
        """
        cfg = self.cfg
        out = self.decoder(self.embed(tokens), _default_positions(tokens, positions), segment_ids, encoded,
                           encoder_segment_ids, deterministic, cache, rows, window)
        x, cache = (out, None) if cache is None else out
        if last is not None:
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [batch, 1, d_model]
        if not cfg.tie_embeddings:
            projection = self.lm_head(x)
        else:
            if cfg.position == "relative":  # T5: the tied table is the input embedding's scale
                x = x * cfg.d_model**-0.5
            projection = output_logits(cfg, x, self.embed, deferred=True)
        logits = projection if deferred else projection.logits()
        return logits if cache is None else (logits, cache)


def init_cache(cfg: ModelConfig, rows: int, length: int, encoder_len: int) -> dict[str, jax.Array]:
    """A zeroed decoding cache of ``rows`` rows in the compute dtype: ``k``/``v``
    [decoder layers, rows, length, kv_heads, head_dim] and ``cross_k``/``cross_v``
    [decoder layers, rows, encoder_len, kv_heads, head_dim]."""
    shape = (cfg.decoder_layers, rows, length, cfg.kv_heads, cfg.head_size)
    cross = (cfg.decoder_layers, rows, encoder_len, cfg.kv_heads, cfg.head_size)
    dtype = compute_dtype(cfg)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "cross_k": jnp.zeros(cross, dtype), "cross_v": jnp.zeros(cross, dtype)}
