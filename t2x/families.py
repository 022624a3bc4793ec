"""Model families: what ``model.family`` means to the data, the model, the step and the eval.

A family is four pieces, and ``FAMILIES`` is the one table naming them:

- a **model** module (``t2x.models``);
- the **row features** its data has and how tokenized documents become them
  (``RowFormat``, run inside the tf.data pipeline: objectives that change lengths belong
  here);
- an **objective**: a batch of rows -> the model's keyword inputs, the targets and their
  weights (run inside the jitted step, from a seeded key: masking that keeps lengths);
- its **eval metrics**: per-batch sums (added up on the host over a whole split) and the
  summary computed from them.

``decoder``: GPT-style, next-token prediction. ``encoder``: BERT-style, masked LM (and
next-sentence prediction, with ``objective.next_sentence``). ``encoder_decoder``:
T5-style, span corruption (or input-target pairs, with ``data.target_key``). ``task`` picks the pieces a
config trains with, fine-tuned classifiers included.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2x.config import Config, ConfigError
from t2x.data.packing import BOS_DOCUMENTS, DOCUMENTS, RowFormat
from t2x.data.tokenizer import Tokenizer
from t2x.models.decoder import DecoderLM
from t2x.models.encdec import EncoderDecoder
from t2x.models.encoder import EncoderMLM
from t2x.data.sentence_pairs import SENTENCE_PAIRS
from t2x.data.span_corruption import SpanCorruption, corrupted_lengths, pack_pairs, raw_length
from t2x.models.layers import VocabLogits
from t2x.objectives import MaskingTokens, causal_lm, masked_lm, sequence_to_sequence, token_losses, token_predictions

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """The pieces of one family (see the module docstring).

    Attributes:
      model: builds the Flax module from ``ModelConfig`` (the module class, for families).
      rows: ``(cfg, tokenizer) -> RowFormat``: the row features and how tokenized
        documents become them.
      objective: ``(cfg, tokenizer) -> fn(batch, rng) -> example``, the example holding
        ``model`` (keyword inputs), ``targets`` and ``weights``.
      eval_sums: ``(cfg, tokenizer) -> fn(outputs, example, batch) -> sums`` of one batch
        (``outputs``: the model's; its logits as ``VocabLogits`` under
        ``train.loss_chunk_len``).
      summarize: host-side sums over a split -> metrics.
      reserved_ids: ``(cfg, tokenizer) -> ids`` past the tokenizer's vocabulary that
        the objective uses (a mask token the tokenizer lacks, sentinels); the model's
        vocabulary must hold them.
    """

    model: Callable[..., Any]
    rows: Callable[[Config, Tokenizer], RowFormat]
    objective: Callable[[Config, Tokenizer], Callable[[Batch, jax.Array], Batch]]
    eval_sums: Callable[[Config, Tokenizer], Callable[[jax.Array, Batch, Batch], dict]]
    summarize: Callable[[dict], dict]
    reserved_ids: Callable[[Config, Tokenizer], list[int]] = lambda cfg, tokenizer: []


# decoder: causal LM over documents each followed by EOS.


def _causal_lm(cfg: Config, tokenizer: Tokenizer):
    return lambda batch, rng: causal_lm(batch, tokenizer.bos_id)


def _next_token_sums(cfg: Config, tokenizer: Tokenizer):
    eos_id = tokenizer.eos_id

    def sums(outputs, example, batch):
        nll, _ = token_predictions(outputs, example["targets"], cfg.train.loss_chunk_len)
        real = batch["segment_ids"] > 0
        return {
            "nll_sum": jnp.sum(nll * example["weights"]),
            "tokens": jnp.sum(real, dtype=jnp.int32),
            "bytes": jnp.sum(batch["num_bytes"]),
            "documents": jnp.sum(real & (example["targets"] == eos_id), dtype=jnp.int32),  # EOS targets
        }

    return sums


def language_model_summary(nll_sum: float, tokens: int, num_bytes: int) -> dict[str, float | int | None]:
    """Loss, perplexity and bits per byte from summed NLL (nats), target tokens and bytes.

    ``perplexity`` is None when it overflows a float; ``bits_per_byte`` is None when the
    scored tokens stand for no bytes.
    """
    loss = nll_sum / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else None,
        "bits_per_byte": nll_sum / (math.log(2) * num_bytes) if num_bytes else None,
        "tokens": int(tokens),
        "bytes": int(num_bytes),
    }


def _decoder_summary(sums: dict) -> dict:
    return {**language_model_summary(float(sums["nll_sum"]), int(sums["tokens"]), int(sums["bytes"])),
            "documents": int(sums["documents"])}  # documents whose last token was evaluated


# encoder: masked LM over documents each as BOS text EOS ([CLS] text [SEP]).


def _mask_reserved(cfg: Config, tokenizer: Tokenizer) -> list[int]:
    return [] if tokenizer.mask_id is not None else [tokenizer.vocab_size]


def masking_tokens(tokenizer: Tokenizer, vocab_size: int) -> MaskingTokens:
    """The mask token (the tokenizer's own, or the first id past its vocabulary), the
    range of random replacements, the never-masked ids and the word starts."""
    mask = tokenizer.mask_id if tokenizer.mask_id is not None else tokenizer.vocab_size
    starts = np.ones(vocab_size, bool)
    starts[: tokenizer.vocab_size] = tokenizer.word_starts()
    # A mask token added at the end of the vocabulary is no random replacement.
    vocab = mask if mask == tokenizer.vocab_size - 1 else tokenizer.vocab_size
    return MaskingTokens(mask=mask, vocab=vocab, keep=(tokenizer.bos_id, tokenizer.eos_id),
                         word_starts=starts)


def _masked_lm(cfg: Config, tokenizer: Tokenizer):
    tokens = masking_tokens(tokenizer, cfg.model.vocab_size)
    return lambda batch, rng: masked_lm(batch, tokens, cfg.objective, rng)


def _masked_lm_and_next_sentence(cfg: Config, tokenizer: Tokenizer):
    masked = _masked_lm(cfg, tokenizer)

    def example(batch, rng):
        out = masked(batch, rng)
        out["model"]["token_types"] = batch["token_types"]
        first = (batch["positions"] == 0) & (batch["segment_ids"] > 0)  # each pair's [CLS]
        out["heads"] = {"next_sentence": {"targets": batch["next_sentence"], "weights": first.astype(jnp.float32)}}
        return out

    return example


def _next_sentence_sums(cfg: Config, tokenizer: Tokenizer):
    def sums(outputs, example, batch):
        logits, heads = outputs
        head = example["heads"]["next_sentence"]
        return {**prediction_sums(logits, example["targets"], example["weights"], chunk_len=cfg.train.loss_chunk_len),
                **prediction_sums(heads["next_sentence"], head["targets"], head["weights"], "pair_")}

    return sums


def _next_sentence_summary(sums: dict) -> dict:
    pairs = int(sums["pair_tokens"])
    return {
        **_predicted_token_summary(sums),
        "next_sentence_loss": float(sums["pair_nll_sum"]) / pairs,
        "next_sentence_accuracy": int(sums["pair_correct"]) / pairs,
        "pairs": pairs,
    }


def prediction_sums(logits: jax.Array | VocabLogits, targets: jax.Array, weights: jax.Array, prefix: str = "",
                    chunk_len: int = 0) -> dict:
    """Over the predictions of weight 1: NLL sum, count and how many were exact (the
    logits computed ``chunk_len`` positions at a time: ``token_predictions``)."""
    nll, predicted = token_predictions(logits, targets, chunk_len)
    chosen = weights > 0
    return {
        f"{prefix}nll_sum": jnp.sum(nll * weights),
        f"{prefix}tokens": jnp.sum(chosen, dtype=jnp.int32),
        f"{prefix}correct": jnp.sum(chosen & (predicted == targets), dtype=jnp.int32),
    }


def _weighted_token_sums(cfg: Config, tokenizer: Tokenizer):
    """Sums over the tokens of weight 1: the masked ones of an encoder, the targets of an
    encoder-decoder."""
    return lambda outputs, example, batch: prediction_sums(outputs, example["targets"], example["weights"],
                                                           chunk_len=cfg.train.loss_chunk_len)


def _predicted_token_summary(sums: dict) -> dict:
    loss = float(sums["nll_sum"]) / int(sums["tokens"])
    return {
        "loss": loss,  # mean NLL of the masked (or target) tokens
        "perplexity": math.exp(loss) if loss < 700 else None,
        "accuracy": int(sums["correct"]) / int(sums["tokens"]),  # of them, predicted exactly
        "tokens": int(sums["tokens"]),
    }


# encoder_decoder: span corruption (T5) into encoder and decoder rows, teacher forcing.


def span_corruption(cfg: Config, tokenizer: Tokenizer) -> SpanCorruption:
    """The span corruption of ``cfg``: rows of ``data.seq_len`` input tokens and
    ``data.target_seq_len`` target tokens (default: what a full input row's targets
    need); sentinels the tokenizer's own ``<extra_id_0>``, ``<extra_id_1>``, ... when it
    has them (an imported T5's), else the ids right past its vocabulary.

    Raises:
      ConfigError: the tokenizer has sentinels of its own, fewer than a piece may use.
    """
    o, d = cfg.objective, cfg.data
    target_len = d.target_seq_len or corrupted_lengths(
        raw_length(d.seq_len, None, o.noise_density, o.mean_span_length), o.noise_density, o.mean_span_length)[1]
    corruption = SpanCorruption(o.noise_density, o.mean_span_length, d.seq_len, target_len, tokenizer.vocab_size)
    own = tokenizer.sentinel_ids()
    if not own:
        return corruption
    if len(own) < corruption.sentinels:
        raise ConfigError(
            f"the tokenizer {tokenizer.source} has {len(own)} sentinels of its own (<extra_id_0> to "
            f"<extra_id_{len(own) - 1}>), and span corruption uses them, but a piece of data.seq_len={d.seq_len} "
            f"rows may need {corruption.sentinels} (objective.noise_density={o.noise_density}, "
            f"objective.mean_span_length={o.mean_span_length}); shorten data.seq_len (or data.target_seq_len) "
            "or lengthen objective.mean_span_length")
    return dataclasses.replace(corruption, own_sentinels=tuple(own))


def encoder_decoder_rows(cfg: Config, tokenizer: Tokenizer) -> RowFormat:
    """Span-corrupted text, or, with ``data.target_key``, the input-target pairs as they
    are (each followed by EOS), packed into encoder and decoder rows."""
    pairs = cfg.data.target_key is not None
    corruption = None if pairs else span_corruption(cfg, tokenizer)
    target_len = (cfg.data.target_seq_len or cfg.data.seq_len) if pairs else corruption.target_len
    lengths = {name: target_len for name in ("targets", "target_segment_ids", "target_positions")}

    def pack(documents, token_bytes, seq_len, tok, rng, targets=None):
        if not pairs:
            return corruption.pack(documents, token_bytes, rng, tok.eos_id)
        eos = np.int32(tok.eos_id)
        return pack_pairs([(np.append(np.asarray(d, np.int32), eos), np.append(np.asarray(t, np.int32), eos),
                            int(np.sum(b))) for d, t, b in zip(documents, targets, token_bytes)], seq_len, target_len)

    return RowFormat(("tokens", "segment_ids", "positions", *lengths, "num_bytes"), pack, lengths)


def _sentinels(cfg: Config, tokenizer: Tokenizer) -> list[int]:
    """The sentinel ids span corruption reserves past the tokenizer's vocabulary: none
    for input-target pairs (nothing is corrupted) or a tokenizer with its own (too few of
    them are refused here, before a run starts)."""
    if cfg.data.target_key is not None:
        return []
    corruption = span_corruption(cfg, tokenizer)
    return [] if corruption.own_sentinels else corruption.sentinel_ids.tolist()


def sentinel_ids(cfg: Config, tokenizer: Tokenizer) -> list[int]:
    """The id of each sentinel ``<extra_id_k>`` an encoder-decoder reads and writes: the
    tokenizer's own (all of them) when it has some, else those span corruption reserves
    past its vocabulary (none for a model trained on input-target pairs)."""
    return tokenizer.sentinel_ids() or _sentinels(cfg, tokenizer)


def _sequence_to_sequence(cfg: Config, tokenizer: Tokenizer):
    return lambda batch, rng: sequence_to_sequence(batch, tokenizer.bos_id)


FAMILIES: dict[str, Family] = {
    "decoder": Family(DecoderLM, lambda cfg, tokenizer: DOCUMENTS, _causal_lm, _next_token_sums, _decoder_summary),
    "encoder": Family(EncoderMLM, lambda cfg, tokenizer: BOS_DOCUMENTS, _masked_lm, _weighted_token_sums,
                      _predicted_token_summary, _mask_reserved),
    "encoder_decoder": Family(EncoderDecoder, encoder_decoder_rows, _sequence_to_sequence, _weighted_token_sums,
                              _predicted_token_summary, _sentinels),
}


def family(name: str) -> Family:
    """The family ``model.family`` names."""
    if name not in FAMILIES:
        raise ConfigError(f"model.family must be one of {list(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


# Classification (``t2x finetune``): a head on any family's model, labelled rows.


def _classify(cfg: Config, tokenizer: Tokenizer):
    def example(batch, rng):
        labels = batch["labels"][:, None]  # [batch, 1]: one prediction per row; -1 pads
        return {
            "model": {"tokens": batch["tokens"], "positions": batch["positions"], "segment_ids": batch["segment_ids"]},
            "targets": jnp.maximum(labels, 0),
            "weights": (labels >= 0).astype(jnp.float32),
        }

    return example


def _classification_sums(cfg: Config, tokenizer: Tokenizer):
    num_labels = len(cfg.classify.labels)

    def sums(logits, example, batch):
        nll, _ = token_losses(logits, example["targets"])
        real = example["weights"][:, 0]
        truth = jax.nn.one_hot(example["targets"][:, 0], num_labels, dtype=jnp.int32) * real[:, None].astype(jnp.int32)
        predicted = jax.nn.one_hot(jnp.argmax(logits[:, 0], -1), num_labels, dtype=jnp.int32)
        return {
            "nll_sum": jnp.sum(nll * example["weights"]),
            "tokens": jnp.sum(real, dtype=jnp.int32),
            "confusion": truth.T @ predicted,  # [true label, predicted label] counts
        }

    return sums


def classification_summary(sums: dict, labels: tuple[str, ...]) -> dict:
    """Loss, accuracy, macro F1 (over the classes that occur as truth or prediction) and
    the confusion matrix (rows: true label, columns: predicted, in ``labels`` order)."""
    confusion = np.asarray(sums["confusion"], np.int64)
    hits = np.diag(confusion)
    truth, predicted = confusion.sum(1), confusion.sum(0)
    present = (truth + predicted) > 0
    f1 = np.where(present, 2 * hits / np.maximum(truth + predicted, 1), 0.0)
    examples = int(confusion.sum())
    return {
        "loss": float(sums["nll_sum"]) / examples,
        "accuracy": float(hits.sum() / examples),
        "macro_f1": float(f1[present].mean()),
        "f1": {label: float(f) for label, f, p in zip(labels, f1, present) if p},
        "confusion_matrix": confusion.tolist(),
        "labels": list(labels),
        "examples": examples,
        # What always answering the evaluation split's own most common label would score.
        "majority_accuracy": float(truth.max() / examples),
    }


def task(cfg: Config) -> Family:
    """The pieces a run trains with: the model family's own; for an encoder with
    ``objective.next_sentence``, sentence pairs and BERT's next-sentence head besides
    masked LM; or, with ``classify.labels``, a classifier on that family's model (its row
    format is the labelled rows of ``t2x.data.labelled``)."""
    if not cfg.classify.enabled and cfg.objective.next_sentence:
        return Family(lambda m: EncoderMLM(m, next_sentence=True), lambda cfg, tokenizer: SENTENCE_PAIRS,
                      _masked_lm_and_next_sentence, _next_sentence_sums, _next_sentence_summary, _mask_reserved)
    if not cfg.classify.enabled:
        return family(cfg.model.family)
    from t2x.models.classifier import Classifier, pooling_of

    labels, pooling = cfg.classify.labels, pooling_of(cfg.model, cfg.classify.pooling)
    return Family(
        lambda m: Classifier(m, len(labels), pooling), family(cfg.model.family).rows, _classify,
        _classification_sums, lambda sums: classification_summary(sums, labels),
    )


def data_key(seed: int, step) -> jax.Array:
    """The key of a step's objective draws (masks), apart from dropout's keys."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x7FFFFFFF), step)
