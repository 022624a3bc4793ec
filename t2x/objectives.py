"""Training objectives: packed batches -> (model inputs, targets, weights), and the loss.

A packed batch holds ``tokens`` [batch, seq] (documents followed by EOS, padded with 0),
``segment_ids`` (1, 2, ... per document in the row; 0 is padding) and ``positions``
(index of each token within its document piece).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from t2x.config import ObjectiveConfig
from t2x.models.layers import sum_last_axis


def causal_lm(batch: dict[str, jax.Array], bos_id: int) -> dict[str, jax.Array]:
    """Next-token prediction inside each packed document.

    Every target token is predicted exactly once: the first token of a document piece
    from BOS, each later one from its predecessor, never across a document boundary.

    Args:
      batch: packed rows with ``tokens``, ``segment_ids`` and ``positions``.
      bos_id: token fed as input at the start of every document piece.

    Returns:
      dict with ``model`` (keyword inputs of the decoder: ``tokens``, ``positions``,
      ``segment_ids``), ``targets`` and ``weights`` (float32).
    """
    tokens = batch["tokens"]
    previous = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    inputs = jnp.where(batch["positions"] == 0, bos_id, previous)
    return {
        "model": {"tokens": inputs, "positions": batch["positions"], "segment_ids": batch["segment_ids"]},
        "targets": tokens,
        "weights": (batch["segment_ids"] > 0).astype(jnp.float32),
    }


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both float32 [batch, seq].

    Its gradient is written out, ``softmax * (g_nll + g_log_z) - one_hot(target) * g_nll``,
    one elementwise pass over the logits: differentiating the target's gather instead
    scatters into a zeroed [batch, seq, vocab] array, which serializes on a GPU."""
    return _token_losses(logits.astype(jnp.float32), targets)


def log_partition(logits: jax.Array) -> jax.Array:
    """``jax.nn.logsumexp(logits, axis=-1)`` of float32 logits, its exponentials summed by
    ``sum_last_axis`` (on XLA:CPU a product with ones: as a reduction, XLA:CPU hands the
    exponential and the sum to YNNPACK as one fusion that runs at a third of the speed
    of its own exponential; GPT-2 small: 158 ms a step over the [2048, 50304] logits;
    docs/performance.md)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # as logsumexp: a row of -inf gives -inf
    return jnp.log(sum_last_axis(jnp.exp(logits - top))) + top[..., 0]


@jax.custom_vjp
def _token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    log_z = log_partition(logits)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z - picked, log_z


def _token_losses_forward(logits, targets):
    nll, log_z = _token_losses(logits, targets)
    return (nll, log_z), (logits, targets, log_z)


def _token_losses_backward(residuals, cotangents):
    logits, targets, log_z = residuals
    g_nll, g_log_z = cotangents
    probs = jnp.exp(logits - log_z[..., None])
    is_target = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    d_logits = probs * (g_nll + g_log_z)[..., None] - jnp.where(is_target, g_nll[..., None], 0.0)
    return d_logits, None


_token_losses.defvjp(_token_losses_forward, _token_losses_backward)


@dataclasses.dataclass(frozen=True)
class MaskingTokens:
    """The token ids masked-LM input corruption needs.

    ``mask``: the mask token; ``vocab``: random replacements are drawn from ids below it
    (the tokenizer's own); ``keep``: ids never chosen for prediction (BOS, EOS);
    ``word_starts``: bool [model vocab], whether a piece begins a word (whole-word masking).
    """

    mask: int
    vocab: int
    keep: tuple[int, ...]
    word_starts: np.ndarray | None = None


def masked_lm(batch: dict[str, jax.Array], tokens: MaskingTokens, cfg: ObjectiveConfig, rng: jax.Array) -> dict[str, jax.Array]:
    """BERT's masked-LM corruption of packed rows.

    Each text token of a row (not padding, BOS or EOS) is chosen with probability
    ``cfg.mask_rate`` (with ``cfg.whole_word_masking``, each word is, and a chosen word's
    pieces all are); a chosen token becomes the mask token with probability
    ``cfg.mask_token_rate``, a random token with ``cfg.random_token_rate``, and stays
    otherwise. The draws come from ``rng`` alone, with shapes of the global batch, so
    they do not depend on how the batch is sharded.

    Returns:
      dict with ``model`` (keyword inputs of the encoder), ``targets`` (the original
      tokens) and ``weights`` (1.0 at chosen positions, float32).
    """
    ids = batch["tokens"]
    choose_key, kind_key, random_key = jax.random.split(rng, 3)
    draw = jax.random.uniform(choose_key, ids.shape)
    if cfg.whole_word_masking:
        # Every piece takes the draw of the piece that starts its word; a document piece
        # always starts a word, so words never cross documents.
        starts = jnp.asarray(tokens.word_starts)[ids] | (batch["positions"] == 0)
        columns = jnp.arange(ids.shape[1])
        start_column = jax.lax.cummax(jnp.where(starts, columns, 0), axis=1)
        draw = jnp.take_along_axis(draw, start_column, axis=1)
    maskable = batch["segment_ids"] > 0
    for special in tokens.keep:
        maskable &= ids != special
    chosen = maskable & (draw < cfg.mask_rate)
    kind = jax.random.uniform(kind_key, ids.shape)
    random_ids = jax.random.randint(random_key, ids.shape, 0, tokens.vocab, dtype=ids.dtype)
    corrupted = jnp.where(kind < cfg.mask_token_rate, tokens.mask,
                          jnp.where(kind < cfg.mask_token_rate + cfg.random_token_rate, random_ids, ids))
    return {
        "model": {"tokens": jnp.where(chosen, corrupted, ids), "positions": batch["positions"],
                  "segment_ids": batch["segment_ids"]},
        "targets": ids,
        "weights": chosen.astype(jnp.float32),
    }


def sequence_to_sequence(batch: dict[str, jax.Array], start_id: int) -> dict[str, jax.Array]:
    """Teacher forcing for an encoder-decoder: the encoder reads the input rows
    (``tokens``, ``segment_ids``, ``positions``); the decoder predicts each target token
    (``targets``, ``target_segment_ids``, ``target_positions``) from the ones before it
    in its pair, the first from ``start_id``.

    Returns:
      dict with ``model`` (keyword inputs of ``EncoderDecoder``), ``targets`` and
      ``weights`` (1.0 on real target tokens, float32).
    """
    targets = batch["targets"]
    previous = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    decoder_tokens = jnp.where(batch["target_positions"] == 0, start_id, previous)
    return {
        "model": {
            "encoder_tokens": batch["tokens"], "encoder_positions": batch["positions"],
            "encoder_segment_ids": batch["segment_ids"], "decoder_tokens": decoder_tokens,
            "decoder_positions": batch["target_positions"], "decoder_segment_ids": batch["target_segment_ids"],
        },
        "targets": targets,
        "weights": (batch["target_segment_ids"] > 0).astype(jnp.float32),
    }
