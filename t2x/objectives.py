"""Training objectives: packed batches -> (inputs, targets, weights), and the loss.

A packed batch holds ``tokens`` [batch, seq] (documents followed by EOS, padded with 0),
``segment_ids`` (1, 2, ... per document in the row; 0 is padding) and ``positions``
(index of each token within its document piece).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def causal_lm(batch: dict[str, jax.Array], bos_id: int) -> dict[str, jax.Array]:
    """Next-token prediction inside each packed document.

    Every target token is predicted exactly once: the first token of a document piece
    from BOS, each later one from its predecessor, never across a document boundary.

    Args:
      batch: packed rows with ``tokens``, ``segment_ids`` and ``positions``.
      bos_id: token fed as input at the start of every document piece.

    Returns:
      dict with ``inputs``, ``targets``, ``weights`` (float32), ``positions``, ``segment_ids``.
    """
    tokens = batch["tokens"]
    previous = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    inputs = jnp.where(batch["positions"] == 0, bos_id, previous)
    return {
        "inputs": inputs,
        "targets": tokens,
        "weights": (batch["segment_ids"] > 0).astype(jnp.float32),
        "positions": batch["positions"],
        "segment_ids": batch["segment_ids"],
    }


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both float32 [batch, seq]."""
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return nll, log_z
