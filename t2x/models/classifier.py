"""A classification head on a pretrained backbone (an encoder, a decoder, or the encoder
of an encoder-decoder)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.layers import dense

BACKBONE = "backbone"  # name of the pretrained model inside the classifier's parameters


class Classifier(nn.Module):
    """The family's model (without its LM head) under ``backbone``, a pooling of its output
    states, dropout, and a dense layer to ``num_labels`` logits (without a bias on a
    decoder, as transformers' sequence classifiers have it).

    Pooling: ``cls`` takes the first (BOS, [CLS]) token through BERT's pooler (dense +
    tanh); ``mean`` averages the tokens of the row; ``last`` takes its last token (EOS),
    the one a decoder has read everything before.

    An encoder-decoder's backbone is the whole ``EncoderDecoder`` module of which only
    ``encode`` runs, so its parameters are the shared embedding and the encoder (the
    decoder's are left out, and reported unused when fine-tuning starts from one).
    """

    cfg: ModelConfig
    num_labels: int
    pooling: str

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """Class logits, float32 [batch, 1, num_labels] (one "position" per row, so the
        token losses of the train step apply unchanged).

        Args:
          tokens: [batch, seq] BOS text EOS, then padding.
          positions: [batch, seq] positions (default 0..seq-1).
          segment_ids: [batch, seq] 1 on the example, 0 on padding (default: all 1).
          deterministic: disables dropout.
        """
        from t2x.families import family

        cfg = self.cfg
        real = jnp.ones_like(tokens) if segment_ids is None else (segment_ids > 0).astype(tokens.dtype)
        backbone = family(cfg.family).model(cfg, name=BACKBONE)
        if cfg.family == "encoder_decoder":
            states = backbone.encode(tokens, positions, real, deterministic)
        else:
            states = backbone(tokens, positions, real, deterministic=deterministic, hidden=True)  # [batch, seq, d_model]
        if self.pooling == "cls":
            pooled = jnp.tanh(dense(cfg, cfg.d_model, ("embed", "embed_out"), name="pooler")(states[:, 0]))
        elif self.pooling == "mean":
            weights = real[..., None].astype(states.dtype)
            pooled = (states * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
        else:
            last = jnp.maximum(real.sum(1) - 1, 0)
            pooled = jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
        pooled = nn.Dropout(cfg.dropout, deterministic=deterministic)(pooled)
        # A decoder's head has no bias, as transformers' *ForSequenceClassification "score".
        logits = dense(cfg, self.num_labels, ("embed", None), use_bias=cfg.use_bias and cfg.family != "decoder",
                       accumulate_float32=True, name="classifier")(pooled)
        return logits[:, None, :]  # [batch, 1, num_labels]


def pooling_of(cfg: ModelConfig, pooling: str) -> str:
    """``classify.pooling`` resolved: ``auto`` is ``cls`` for encoders, ``last`` for
    decoders and ``mean`` for encoder-decoders (whose encoders have no [CLS] token)."""
    if pooling != "auto":
        return pooling
    return {"encoder": "cls", "encoder_decoder": "mean"}.get(cfg.family, "last")
