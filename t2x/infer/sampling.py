"""Choosing the next token: greedy, temperature, top-k and top-p, per row of a batch.

Every row has its own settings and its own random stream, so a request's tokens do not
depend on which other requests share its batch: the key of a row's n-th sampled token is
``fold_in(key(seed), n)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

MAX_BEAMS = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one request is decoded.

    temperature 0 is greedy (the most likely token, ties to the lowest id); top_k 0 and
    top_p 1 leave the distribution whole. ``num_beams`` above 1 is beam search, ranked by
    log-probability over the length penalty ((5 + length) / 6) ** ``length_penalty``
    (encoder-decoders).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    num_beams: int = 1
    length_penalty: float = 0.6

    def problems(self, max_new_tokens_limit: int | None = None) -> list[tuple[str, str]]:
        """(field, what is wrong) for each setting out of range; empty when all are fine.
        (Generation also stops at the model's context, whatever ``max_new_tokens``.)"""
        out = []
        limit = max_new_tokens_limit
        if self.max_new_tokens < 1 or (limit is not None and self.max_new_tokens > limit):
            bounds = f"between 1 and {limit}" if limit is not None else ">= 1"
            out.append(("max_new_tokens", f"must be {bounds}, got {self.max_new_tokens}"))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            out.append(("temperature", f"must be a finite number >= 0, got {self.temperature}"))
        if self.top_k < 0:
            out.append(("top_k", f"must be >= 0 (0: off), got {self.top_k}"))
        if not (0 < self.top_p <= 1):
            out.append(("top_p", f"must be in (0, 1], got {self.top_p}"))
        if not 0 <= self.seed < 2**32:
            out.append(("seed", f"must be in [0, 2**32), got {self.seed}"))
        if any(not s for s in self.stop):
            out.append(("stop", "stop strings must not be empty"))
        if not 1 <= self.num_beams <= MAX_BEAMS:
            out.append(("num_beams", f"must be between 1 and {MAX_BEAMS}, got {self.num_beams}"))
        if not (math.isfinite(self.length_penalty) and self.length_penalty >= 0):
            out.append(("length_penalty", f"must be a finite number >= 0, got {self.length_penalty}"))
        return out


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    counts: jax.Array,
) -> jax.Array:
    """The next token of each row.

    Args:
      logits: [batch, vocab] float32.
      temperature, top_p: [batch] float32; top_k, seeds, counts: [batch] int32/uint32
        (``counts``: tokens the row has sampled so far, which picks its key).

    Returns:
      [batch] int32 token ids.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Sorting the vocabulary costs more than the rest of a small model's step: only when
    # some row samples.
    return jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: jnp.where(temperature > 0, _draw(logits, temperature, top_k, top_p, seeds, counts), greedy),
        lambda: greedy,
    )


def _draw(logits, temperature, top_k, top_p, seeds, counts):
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)  # [batch, 1]
    probs = jax.nn.softmax(jnp.where(ranked >= kth, ranked, -jnp.inf), axis=-1)
    # Keep the smallest prefix of the ranking whose probability reaches top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    nucleus = jnp.min(jnp.where(before < top_p[:, None], ranked, jnp.inf), axis=-1, keepdims=True)
    allowed = jnp.where(scaled >= jnp.maximum(kth, nucleus), scaled, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds.astype(jnp.uint32), counts)
    return jax.vmap(jax.random.categorical)(keys, allowed).astype(jnp.int32)
