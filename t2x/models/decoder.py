"""GPT-style decoder-only language model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.attention import attention_mask, cache_mask
from t2x.models.layers import constrain, input_embeddings, norm, output_logits
from t2x.models.transformer import BlockStack


class DecoderLM(nn.Module):
    """Token embedding, optional learned positions, pre-norm blocks, final norm, LM head."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        cache: dict | None = None,
        rows: jax.Array | None = None,
        window: int | None = None,
        last: jax.Array | None = None,
        hidden: bool = False,
        deferred: bool = False,
    ):
        """Next-token logits.

        Args:
          tokens: [batch, seq] input token ids.
          positions: [batch, seq] position of each token within its document (default 0..seq-1).
          segment_ids: [batch, seq] packed-document ids, 0 for padding (default: one document).
          deterministic: disables dropout.
          cache: a KV cache {"k", "v"} [layers, cache rows, cache_len, kv_heads,
            head_dim] (``InferenceModel.init_cache``). Each token's keys and values are
            written at its position of its cache row, and it attends to that row's slots
            up to its position; ``segment_ids`` do not apply.
          rows: [batch] the cache row of each row of ``tokens`` (default: the same index;
            the batch is then the cache's).
          window: with a cache, attend over its first ``window`` slots only (a static
            size; every position of ``tokens`` must be below it). Default: all.
          last: [batch] index of the one position per row whose logits are computed.
          hidden: return the final-norm hidden states instead of logits.
          deferred: return the ``VocabLogits`` that make the logits instead (for a loss
            that computes them a chunk at a time).

        Returns:
          float32 logits [batch, seq (1 with ``last``), vocab_size], accumulated in float32
          whatever the compute dtype (or hidden states [batch, seq, d_model] in the compute
          dtype, or ``VocabLogits``); with a cache, (that, the updated cache).
        """
        cfg = self.cfg
        seq_len = tokens.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), tokens.shape)
        x, embed = input_embeddings(cfg, tokens, positions)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, seq, d_model]
        if cache is None:
            mask = attention_mask(segment_ids, seq_len, causal=True)
            x = BlockStack(cfg, deterministic, causal=True, name="blocks")(x, positions, mask, segments=segment_ids)
        else:
            mask = cache_mask(positions, window or cache["k"].shape[2])
            x, cache = BlockStack(cfg, deterministic, window, name="blocks")(x, positions, mask, cache, rows)
        x = norm(cfg, "final_norm")(x)
        if hidden:
            return x if cache is None else (x, cache)
        if last is not None:
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [batch, 1, d_model]
        logits = output_logits(cfg, x, embed, deferred)
        return logits if cache is None else (logits, cache)
