"""Training objectives: packed batches -> (model inputs, targets, weights), and the loss.

A packed batch holds ``tokens`` [batch, seq] (documents followed by EOS, padded with 0),
``segment_ids`` (1, 2, ... per document in the row; 0 is padding) and ``positions``
(index of each token within its document piece).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from t2x.config import ObjectiveConfig
from t2x.models.layers import VocabLogits, constrain, sum_last_axis
from t2x.parallel.sharding import batch_shards


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


def token_predictions(logits: jax.Array | VocabLogits, targets: jax.Array,
                      chunk_len: int = 0) -> tuple[jax.Array, jax.Array]:
    """Each position's NLL of its target (float32 [batch, seq]) and its most likely id
    ([batch, seq]), from logits or from ``VocabLogits``; with ``chunk_len`` below the
    row length, computed at most ``chunk_len`` positions of each row at a time
    (``_chunked``), never holding the whole batch's logits."""
    if not isinstance(logits, VocabLogits):
        return token_losses(logits, targets)[0], jnp.argmax(logits, -1)
    batch, seq = targets.shape
    if not chunk_len or chunk_len >= seq:
        return token_predictions(logits.logits(), targets)

    def body(_, xs):
        hidden, chunk_targets = xs  # [batch, chunk_len, ...]
        return None, token_predictions(logits.replace(hidden=hidden).logits(), chunk_targets)

    _, outputs = jax.lax.scan(body, None, (_chunked(logits.hidden, chunk_len, batch),
                                           _chunked(targets, chunk_len, batch)))
    return tuple(_unchunked(x, batch, seq) for x in outputs)


def _chunked(x: jax.Array, chunk_len: int, groups: int) -> jax.Array:
    """[batch, seq, ...] -> [chunks, groups, batch / groups x length, ...]: the sequence
    cut into as few chunks of at most ``chunk_len`` positions as it takes, all of one
    length (120 positions by 64: 2 chunks of 60; the last padded with zeros where the
    length does not divide the row), and each chunk's positions in ``groups`` groups of
    whole rows, row by row."""
    batch, seq = x.shape[:2]
    chunk_len = -(-seq // -(-seq // chunk_len))
    pad = -seq % chunk_len
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x
    x = x.reshape(groups, batch // groups, (seq + pad) // chunk_len, chunk_len, *x.shape[2:])
    return jnp.moveaxis(x, 2, 0).reshape((seq + pad) // chunk_len, groups, -1, *x.shape[4:])


def _unchunked(x: jax.Array, batch: int, seq: int) -> jax.Array:
    """``_chunked``'s inverse: [chunks, groups, rows, ...] -> [batch, seq, ...]."""
    chunks, groups = x.shape[:2]
    x = x.reshape(chunks, groups, batch // groups, -1, *x.shape[3:])  # [chunks, groups, rows of a group, chunk_len, ...]
    return jnp.moveaxis(x, 0, 2).reshape(batch, -1, *x.shape[4:])[:, :seq]


def smoothed_nll(nll: jax.Array, log_z: jax.Array, mean_logit: jax.Array, smoothing: float) -> jax.Array:
    """Each token's cross-entropy against its target smoothed as the original
    Transformer's (1 - e on the target, e = ``smoothing`` spread evenly over the
    vocabulary): (1 - e) NLL + e (log Z - mean logit)."""
    return (1 - smoothing) * nll + smoothing * (log_z - mean_logit) if smoothing else nll


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


def chunked_lm_loss(projection: VocabLogits, targets: jax.Array, weights: jax.Array, scale: float | jax.Array, *,
                    chunk_len: int,
                    z_loss: float = 0.0, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A language model's training loss from ``VocabLogits``, never holding the logits
    of more than ``chunk_len`` positions of each row at once.

    ``value`` = ``scale`` x sum over tokens of weight x ((1 - e) NLL + e (log Z - mean
    logit) + ``z_loss`` log(Z)^2), e = ``label_smoothing``: ``make_objective``'s loss.
    Its gradient is computed in the forward pass, chunk by chunk, as the loss is: each
    chunk's [batch, chunk_len, vocab] logits give their softmax's gradient at once, which
    goes into the states' and the projection's gradients by the two backward products and
    is dropped. The backward pass only scales those gradients, so no logits are kept
    for it and none computed again: the same products as the whole logits' loss. The
    rows are cut into chunks of one length, at most ``chunk_len`` (``_chunked``), the
    last padded with weight-0 positions where that length does not divide them.

    Args:
      projection: the model's ``VocabLogits`` ([batch, seq, d_model] states).
      targets: int [batch, seq] target ids.
      weights: float32 [batch, seq] token weights (0: not a target).
      scale: the scalar the weighted sum is multiplied by (1 / tokens, for a mean).
      chunk_len: most positions per chunk.

    Returns:
      ``(value, nll_sum, z_sum)``: the loss; sum of weight x NLL; sum of weight x
      log(Z)^2. Only ``value`` is differentiated, and only with respect to
      ``projection`` (the sums, ``weights`` and ``scale`` are constants to autodiff).
    """
    value, nll_sum, z_sum = _chunked_loss(projection, targets, jax.lax.stop_gradient(weights),
                                          jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32)),
                                          (chunk_len, float(z_loss), float(label_smoothing)))
    return value, jax.lax.stop_gradient(nll_sum), jax.lax.stop_gradient(z_sum)


def _chunk_sums(projection: VocabLogits, targets, weights, scale, settings, with_grads: bool):
    """(value, nll_sum, z_sum), and with ``with_grads`` the gradient of ``value`` with
    respect to the hidden states, the projection's weight and its bias.

    Sums over rows are kept per shard of the batch ([shards, ...], each on its devices)
    and added up after the last chunk: summed in each chunk, a sharded batch's
    projection gradient would be all-reduced once a chunk instead of once."""
    chunk_len, z_coef, smoothing = settings
    hidden, weight, bias, axis = projection.hidden, projection.weight, projection.bias, projection.vocab_axis
    batch, seq, width = hidden.shape
    vocab = weight.shape[axis]
    shards = batch_shards(batch)
    by_shard = "batch" if shards > 1 else None  # the [shards] axis, over the batch's mesh axes
    weight_axes = (by_shard, "vocab", None) if axis == 0 else (by_shard, None, "vocab")

    def body(carry, xs):
        sums, d_weight, d_bias = carry
        x, t, w = xs
        x = constrain(x, (by_shard, None, "act_embed"))  # [shards, rows, width]
        logits = jax.lax.dot_general(x, weight, (((2,), (1 - axis,)), ((), ())), preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias
        logits = constrain(logits, (by_shard, None, "act_vocab"))  # [shards, rows, vocab] float32
        log_z = log_partition(logits)
        nll = log_z - jnp.take_along_axis(logits, t[..., None].astype(jnp.int32), axis=-1)[..., 0]
        loss = smoothed_nll(nll, log_z, sum_last_axis(logits) / vocab if smoothing else 0.0, smoothing)
        z = jnp.square(log_z)
        sums = sums + jnp.stack([jnp.sum((loss + z_coef * z) * w, -1), jnp.sum(nll * w, -1), jnp.sum(z * w, -1)], -1)
        if not with_grads:
            return (sums, d_weight, d_bias), None
        # d value / d logits = scale w ((1 + 2 z log Z) softmax - (1 - e) one_hot - e / vocab)
        coef = (scale * w)[..., None]
        is_target = jnp.arange(vocab, dtype=jnp.int32) == t[..., None]
        d_logits = (jnp.exp(logits - log_z[..., None]) * (coef * (1 + 2 * z_coef * log_z[..., None]))
                    - jnp.where(is_target, coef * (1 - smoothing), 0.0))
        if smoothing:
            d_logits = d_logits - coef * (smoothing / vocab)
        if bias is not None:
            d_bias = constrain(d_bias + jnp.sum(d_logits, axis=1), (by_shard, "vocab"))
        d_logits = d_logits.astype(hidden.dtype)  # the backward products in the compute dtype
        d_x = constrain(jax.lax.dot_general(d_logits, weight, (((2,), (axis,)), ((), ()))),
                        (by_shard, None, "act_embed"))  # [shards, rows, width]
        operands = (d_logits, x) if axis == 0 else (x, d_logits)
        d_weight = d_weight + jax.lax.dot_general(*operands, (((1,), (1,)), ((0,), (0,))),
                                                  preferred_element_type=jnp.float32)
        return (sums, constrain(d_weight, weight_axes), d_bias), d_x  # d_weight: [shards, *weight.shape]

    zero = jnp.zeros((), jnp.float32)
    init = (jnp.zeros((shards, 3), jnp.float32),
            constrain(jnp.zeros((shards, *weight.shape), jnp.float32), weight_axes) if with_grads else zero,
            constrain(jnp.zeros((shards, vocab), jnp.float32), (by_shard, "vocab")) if with_grads and bias is not None
            else zero)
    xs = tuple(_chunked(x, chunk_len, shards) for x in (hidden, targets, weights))  # padded with weight 0
    (sums, d_weight, d_bias), d_x = jax.lax.scan(body, init, xs)
    sums = jnp.sum(sums, 0)
    outputs = (sums[0] * scale, sums[1], sums[2])
    if not with_grads:
        return outputs
    # The shards' gradients added up in the weight's dtype (bfloat16 under bfloat16), as
    # the whole logits' backward product would give it.
    grads = projection.replace(hidden=_unchunked(d_x, batch, seq), weight=jnp.sum(d_weight.astype(weight.dtype), 0),
                               bias=None if bias is None else jnp.sum(d_bias, 0))
    return outputs, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_loss(projection, targets, weights, scale, settings):
    return _chunk_sums(projection, targets, weights, scale, settings, with_grads=False)


def _chunked_loss_forward(projection, targets, weights, scale, settings):
    return _chunk_sums(projection, targets, weights, scale, settings, with_grads=True)  # (outputs, residuals: grads)


def _chunked_loss_backward(settings, grads, cotangents):
    g = cotangents[0]  # the sums' cotangents are zero (stop_gradient in chunked_lm_loss)
    return jax.tree.map(lambda x: (g * x).astype(x.dtype), grads), None, None, None


_chunked_loss.defvjp(_chunked_loss_forward, _chunked_loss_backward)


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

    A row predicts at most ``cfg.predictions_per_row(seq)`` = P tokens: where more are
    chosen, those of the largest draws (whole words together) are not, neither
    corrupted nor predicted, as BERT's ``max_predictions_per_seq``. With P below the
    row length the example names the positions to predict, and the encoder runs its
    masked-LM head (and vocabulary projection) at those alone.

    Returns:
      dict with ``model`` (keyword inputs of the encoder; with P below the row length
      ``predict_at``, int32 [batch, P]: the chosen positions of each row in order, then
      unchosen ones), ``targets`` (the original tokens) and ``weights`` (1.0 at chosen
      positions, float32), [batch, seq] or, with ``predict_at``, [batch, P] at its
      positions.
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
    seq = ids.shape[1]
    predictions = cfg.predictions_per_row(seq)
    if predictions < seq:
        # The (P + 1)-th smallest draw of the chosen (2: fewer chosen) bounds those kept:
        # at most P draws are below it, and a word's pieces share one draw.
        bound = -jax.lax.top_k(jnp.where(chosen, -draw, -2.0), predictions + 1)[0][:, -1:]
        chosen &= draw < bound
    kind = jax.random.uniform(kind_key, ids.shape)
    random_ids = jax.random.randint(random_key, ids.shape, 0, tokens.vocab, dtype=ids.dtype)
    corrupted = jnp.where(kind < cfg.mask_token_rate, tokens.mask,
                          jnp.where(kind < cfg.mask_token_rate + cfg.random_token_rate, random_ids, ids))
    model = {"tokens": jnp.where(chosen, corrupted, ids), "positions": batch["positions"],
             "segment_ids": batch["segment_ids"]}
    targets, weights = ids, chosen.astype(jnp.float32)
    if predictions < seq:
        at = jnp.argsort(~chosen, axis=1, stable=True)[:, :predictions].astype(jnp.int32)
        model["predict_at"] = at
        targets, weights = (jnp.take_along_axis(x, at, axis=1) for x in (targets, weights))
    return {"model": model, "targets": targets, "weights": weights}


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
