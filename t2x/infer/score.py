"""Scoring, embedding and classifying texts.

Scoring follows training's convention: a text is the sequence BOS, its tokens (and, with
``eos``, the end-of-text token), and each token is predicted from everything before it.
A text longer than the context is scored with a sliding window: each window starts with
BOS, advances by ``stride`` tokens, and scores only the tokens no earlier window scored,
so every token is scored once, with at least ``window - stride`` tokens of context once
the first window is full.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2x.infer.engine import RequestError, bucket
from t2x.infer.model import InferenceModel
from t2x.objectives import token_predictions
from t2x.parallel import sharding_context

LN2 = math.log(2.0)
# Positions of a window whose logits are computed at a time: a batch of 8 windows of
# GPT-2's 1024 tokens would otherwise hold 1.6 GB of float32 logits.
SCORE_CHUNK = 128


@dataclasses.dataclass
class Score:
    log_likelihood: float  # natural log of the text's probability (its tokens, and EOS with ``eos``)
    tokens: int
    bytes: int  # UTF-8 bytes of the text
    perplexity: float  # exp(-log_likelihood / tokens)
    bits_per_byte: float | None  # -log_likelihood / ln 2 / bytes; None for an empty text

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Window:
    text: int  # index of the text
    inputs: list[int]  # BOS then up to window-1 tokens
    targets: list[int]
    scored_from: int  # targets before this index were scored by an earlier window


def windows(text_index: int, ids: list[int], bos: int, window: int, stride: int) -> list[_Window]:
    """The windows scoring ``ids`` (the targets: the text's tokens, EOS included if scored)."""
    out, start, scored = [], 0, 0
    while True:
        targets = ids[start : start + window]
        out.append(_Window(text_index, [bos, *ids[start : start + len(targets) - 1]], targets, scored - start))
        scored = start + len(targets)
        if scored >= len(ids):
            return out
        start += stride


POOLINGS = {"decoder": ("mean", "last", "max"), "encoder": ("cls", "mean", "max"), "encoder_decoder": ("mean", "max")}


@functools.cache
def _programs(module, chunk_len: int):
    """The jitted scoring, hidden-state and class-probability functions of a model,
    shared by every scorer of it; scoring computes the logits of ``chunk_len`` positions
    of each row at a time (``token_predictions``)."""

    def log_probs(params, inputs, targets, weights):
        lm = module.apply({"params": params}, inputs, deferred=True)
        nll, _ = token_predictions(lm, targets, chunk_len)
        return -(nll * weights).sum(axis=-1)

    def hidden(params, inputs, segment_ids):
        if module.cfg.family == "encoder_decoder":  # the encoder's output states
            return module.apply({"params": params}, inputs, None, segment_ids, method="encode").astype(jnp.float32)
        return module.apply({"params": params}, inputs, None, segment_ids, hidden=True).astype(jnp.float32)

    def probabilities(params, inputs, segment_ids):
        return jax.nn.softmax(module.apply({"params": params}, inputs, None, segment_ids)[:, 0], axis=-1)

    return jax.jit(log_probs), jax.jit(hidden), jax.jit(probabilities)


class Scorer:
    """Per-text log-likelihoods and pooled hidden states, batched over texts.

    Args:
      model: the loaded model.
      batch_size: rows per forward pass (rounded up to the batch devices).
      window: tokens per window, BOS included (default: the model's context).
      stride: tokens a window advances (default: half the window).
      chunk_len: positions of a row whose logits a score computes at a time.
    """

    def __init__(self, model: InferenceModel, batch_size: int = 8, window: int | None = None, stride: int | None = None,
                 chunk_len: int = SCORE_CHUNK):
        self.model = model
        self.window = window or model.context
        if not 2 <= self.window <= model.context:
            raise RequestError("window", f"must be between 2 and the model's context {model.context}, got {self.window}")
        self.stride = stride or max(1, self.window // 2)
        if not 1 <= self.stride <= self.window:
            raise RequestError("stride", f"must be between 1 and the window {self.window}, got {self.stride}")
        ways = model.batch_ways
        self.batch_size = -(-batch_size // ways) * ways
        self._log_probs, self._hidden, self._probabilities = _programs(model.module, chunk_len)

    def score(self, texts: Sequence[str], eos: bool = False) -> list[Score]:
        """Log-likelihood, token count, perplexity and bits per byte of each text.

        Raises:
          RequestError: the model is not a decoder language model.
        """
        if not self.model.generates:
            raise RequestError("model", "only a decoder language model scores texts; this is "
                               + _kind(self.model))
        tok = self.model.tokenizer
        encoded = tok.encode(list(texts))
        todo = []
        for i, ids in enumerate(encoded):
            ids = [*ids, tok.eos_id] if eos else ids
            if ids:
                todo.extend(windows(i, ids, tok.bos_id, self.window, self.stride))
        totals = np.zeros(len(texts), np.float64)
        for first in range(0, len(todo), self.batch_size):
            chunk = todo[first : first + self.batch_size]
            length = bucket(max(len(w.inputs) for w in chunk), self.model.context)
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros_like(inputs)
            weights = np.zeros(inputs.shape, np.float32)
            for r, w in enumerate(chunk):
                inputs[r, : len(w.inputs)] = w.inputs
                targets[r, : len(w.targets)] = w.targets
                weights[r, max(w.scored_from, 0) : len(w.targets)] = 1.0
            with sharding_context(self.model.mesh):
                sums = np.asarray(jax.device_get(self._log_probs(self.model.params, inputs, targets, weights)))
            for r, w in enumerate(chunk):
                totals[w.text] += sums[r]
        out = []
        for i, text in enumerate(texts):
            n = len(encoded[i]) + (1 if eos else 0)
            size = len(text.encode("utf-8"))
            ll = float(totals[i])
            out.append(Score(ll, n, size, math.exp(-ll / n) if n else float("nan"), -ll / LN2 / size if size else None))
        return out

    def _sequences(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text as the model reads it, cut to the context: BOS and its tokens; for
        encoders and classifiers EOS after them ([CLS] text [SEP]); for an encoder-decoder's
        encoder its tokens and EOS, as it was trained."""
        tok, context = self.model.tokenizer, self.model.context
        closed = self.model.cfg.model.family == "encoder" or self.model.classifies
        out = []
        for i, ids in enumerate(tok.encode(list(texts))):
            if not ids:
                raise RequestError("texts", f"text {i} is empty: it has no token")
            if self.model.translates:
                out.append([*ids[: context - 1], tok.eos_id])
            else:
                out.append([tok.bos_id, *ids[: context - 2], tok.eos_id] if closed else [tok.bos_id, *ids[: context - 1]])
        return out

    def _batches(self, rows: list[list[int]]):
        """(first row index, inputs, segment ids) per batch, padded to a bucketed length."""
        for first in range(0, len(rows), self.batch_size):
            chunk = rows[first : first + self.batch_size]
            length = bucket(max(len(r) for r in chunk), self.model.context)
            inputs = np.zeros((self.batch_size, length), np.int32)
            segment_ids = np.zeros_like(inputs)
            for r, ids in enumerate(chunk):
                inputs[r, : len(ids)], segment_ids[r, : len(ids)] = ids, 1
            yield first, inputs, segment_ids

    def embed(self, texts: Sequence[str], pooling: str = "mean", normalize: bool = False) -> np.ndarray:
        """One vector per text [len(texts), d_model] (float32), pooled from the model's
        final hidden states (an encoder-decoder's: its encoder's): ``mean`` or ``max``
        over the text's tokens (BOS and EOS left out), the first token's (``cls``,
        encoders: [CLS]) or the last token's (``last``, decoders). Texts longer than the
        context are cut to fit it.

        Raises:
          RequestError: a pooling the model's family lacks, a classifier, or an empty text.
        """
        family = self.model.cfg.model.family
        if self.model.classifies:
            raise RequestError("model", "a classifier classifies texts; embed with the model it was fine-tuned from")
        if family not in POOLINGS:
            raise RequestError("model", f"embeddings come from a decoder, an encoder or an encoder-decoder's encoder; "
                               f"this is {_kind(self.model)}")
        if pooling not in POOLINGS[family]:
            raise RequestError("pooling", f"{_kind(self.model)} pools {', '.join(POOLINGS[family])}, got {pooling!r}")
        rows = self._sequences(texts)
        # The text's tokens: after BOS, and before an encoder's EOS; an encoder-decoder's
        # rows have no BOS.
        text_start, text_end = (0, -1) if family == "encoder_decoder" else (1, -1) if family == "encoder" else (1, None)
        out = np.zeros((len(texts), self.model.cfg.model.d_model), np.float32)
        for first, inputs, segment_ids in self._batches(rows):
            with sharding_context(self.model.mesh):
                states = np.asarray(jax.device_get(self._hidden(self.model.params, inputs, segment_ids)))
            for r, ids in enumerate(rows[first : first + self.batch_size]):
                tokens = states[r, text_start : len(ids)][:text_end]
                out[first + r] = {"mean": lambda: tokens.mean(0), "max": lambda: tokens.max(0),
                                  "last": lambda: tokens[-1], "cls": lambda: states[r, 0]}[pooling]()
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out

    def classify(self, texts: Sequence[str]) -> list[dict]:
        """Each text's most probable label and every label's probability.

        Raises:
          RequestError: the model is not a classifier, or a text is empty.
        """
        if not self.model.classifies:
            raise RequestError("model", f"only a fine-tuned classifier classifies texts; this is {_kind(self.model)}")
        labels = self.model.cfg.classify.labels
        rows = self._sequences(texts)
        out = []
        for first, inputs, segment_ids in self._batches(rows):
            with sharding_context(self.model.mesh):
                probs = np.asarray(jax.device_get(self._probabilities(self.model.params, inputs, segment_ids)))
            for r in range(min(self.batch_size, len(rows) - first)):
                out.append({"label": labels[int(probs[r].argmax())],
                            "probabilities": {label: float(p) for label, p in zip(labels, probs[r])}})
        return out


def _kind(model: InferenceModel) -> str:
    family = model.cfg.model.family
    return f"a {family} classifier" if model.classifies else f"an {family}" if family[0] in "aeiou" else f"a {family}"
