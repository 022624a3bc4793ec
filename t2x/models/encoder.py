"""BERT-style bidirectional encoder with a masked-LM head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.attention import attention_mask
from t2x.models.layers import VocabLogits, constrain, dense, embedding, input_embeddings, logical, norm, output_logits
from t2x.models.transformer import BlockStack


class EncoderMLM(nn.Module):
    """Token, position and token-type embeddings (normalized with ``model.embed_norm``),
    bidirectional blocks (post-norm as BERT, or pre-norm with a final norm), and BERT's
    masked-LM head: dense, GELU, norm, then the vocabulary projection (tied to the token
    embedding with ``model.tie_embeddings``) plus a bias.
    """

    cfg: ModelConfig
    next_sentence: bool = False  # add BERT's next-sentence head (pooler, then 2 logits) at every position

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        token_types: jax.Array | None = None,
        predict_at: jax.Array | None = None,
        deterministic: bool = True,
        hidden: bool = False,
        deferred: bool = False,
    ) -> jax.Array | VocabLogits | tuple:
        """Masked-LM logits.

        Args:
          tokens: [batch, seq] input token ids (some replaced by the mask token).
          positions: [batch, seq] position of each token within its document (default 0..seq-1).
          segment_ids: [batch, seq] packed-document ids, 0 for padding (default: one document).
            Every token attends to every token of its own document, in both directions.
          token_types: [batch, seq] sentence A (0) or B (1) ids (default 0).
          predict_at: int [batch, predictions] positions at which to run the masked-LM
            head (default: every position).
          deterministic: disables dropout.
          hidden: return the encoder's output states [batch, seq, d_model] instead.
          deferred: return the masked-LM head's ``VocabLogits`` (bias included) instead
            of its logits (for a loss that computes them a chunk at a time).

        Returns:
          float32 logits [batch, seq, vocab_size], or [batch, predictions, vocab_size] at
          ``predict_at`` (``VocabLogits`` with ``deferred``); with
          ``next_sentence``, also
          ``{"next_sentence": float32 [batch, seq, 2]}``: at a pair's first token ([CLS]),
          the logits of "B follows A" (0) and "B is random" (1).
        """
        cfg = self.cfg
        seq_len = tokens.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), tokens.shape)
        x, embed = input_embeddings(cfg, tokens, positions)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + embedding(cfg, cfg.type_vocab_size, ("position", "embed"), "type_embed")(types)
        if cfg.embed_norm:
            x = norm(cfg, "embed_norm")(x)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, seq, d_model]
        mask = attention_mask(segment_ids, seq_len, causal=False)
        x = BlockStack(cfg, deterministic, name="blocks")(x, positions, mask, segments=segment_ids)
        if cfg.norm_position == "pre":
            x = norm(cfg, "final_norm")(x)
        if hidden:
            return x
        h = x
        if predict_at is not None:
            h = constrain(jnp.take_along_axis(x, predict_at[..., None], axis=1), ("batch", "length", "act_embed"))
        h = dense(cfg, cfg.d_model, ("embed", "embed_out"), name="mlm_dense")(h)
        h = norm(cfg, "mlm_norm")(nn.gelu(h, approximate=cfg.mlp == "gelu"))
        bias = self.param("mlm_bias", logical(nn.initializers.zeros, ("vocab",)),
                          (cfg.vocab_size,), jnp.float32)
        projection = output_logits(cfg, h, embed, deferred=True).replace(bias=bias)
        logits = projection if deferred else projection.logits()
        if not self.next_sentence:
            return logits
        pooled = jnp.tanh(dense(cfg, cfg.d_model, ("embed", "embed_out"), name="pooler")(x))
        pair = dense(cfg, 2, ("embed", None), accumulate_float32=True, name="next_sentence")(pooled)
        return logits, {"next_sentence": pair}

