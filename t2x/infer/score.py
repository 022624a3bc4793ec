"""Scoring and embedding texts.

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

from t2x.config import ModelConfig
from t2x.infer.engine import RequestError, bucket
from t2x.infer.model import InferenceModel
from t2x.models import build_model
from t2x.objectives import token_losses
from t2x.parallel import sharding_context

LN2 = math.log(2.0)


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


@functools.cache
def _programs(cfg: ModelConfig):
    """The jitted scoring and hidden-state functions of a model config, shared by every scorer of it."""
    module = build_model(cfg)

    def log_probs(params, inputs, targets, weights):
        logits = module.apply({"params": params}, inputs)
        nll, _ = token_losses(logits, targets)
        return -(nll * weights).sum(axis=-1)

    def hidden(params, inputs):
        return module.apply({"params": params}, inputs, hidden=True).astype(jnp.float32)

    return jax.jit(log_probs), jax.jit(hidden)


class Scorer:
    """Per-text log-likelihoods and pooled hidden states, batched over texts.

    Args:
      model: the loaded model.
      batch_size: rows per forward pass (rounded up to the batch devices).
      window: tokens per window, BOS included (default: the model's context).
      stride: tokens a window advances (default: half the window).
    """

    def __init__(self, model: InferenceModel, batch_size: int = 8, window: int | None = None, stride: int | None = None):
        self.model = model
        self.window = window or model.context
        if not 2 <= self.window <= model.context:
            raise RequestError("window", f"must be between 2 and the model's context {model.context}, got {self.window}")
        self.stride = stride or max(1, self.window // 2)
        if not 1 <= self.stride <= self.window:
            raise RequestError("stride", f"must be between 1 and the window {self.window}, got {self.stride}")
        ways = model.batch_ways
        self.batch_size = -(-batch_size // ways) * ways
        self._log_probs, self._hidden = _programs(model.cfg.model)

    def _rows(self, count: int) -> int:
        return -(-count // self.batch_size) * self.batch_size

    def score(self, texts: Sequence[str], eos: bool = False) -> list[Score]:
        """Log-likelihood, token count, perplexity and bits per byte of each text."""
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

    def embed(self, texts: Sequence[str], pooling: str = "mean", normalize: bool = False) -> np.ndarray:
        """One vector per text [len(texts), d_model] (float32): the final-norm hidden
        states of its tokens, averaged (``mean``) or of its last token (``last``); texts
        longer than the context are cut to their first ``context - 1`` tokens.

        Raises:
          RequestError: an unknown pooling, or an empty text (it has no token to pool).
        """
        if pooling not in ("mean", "last"):
            raise RequestError("pooling", f"must be mean or last, got {pooling!r}")
        tok = self.model.tokenizer
        encoded = [ids[: self.model.context - 1] for ids in tok.encode(list(texts))]
        for i, ids in enumerate(encoded):
            if not ids:
                raise RequestError("texts", f"text {i} is empty: it has no token to embed")
        out = np.zeros((len(texts), self.model.cfg.model.d_model), np.float32)
        for first in range(0, len(texts), self.batch_size):
            chunk = encoded[first : first + self.batch_size]
            length = bucket(1 + max(len(ids) for ids in chunk), self.model.context)
            inputs = np.zeros((self.batch_size, length), np.int32)
            for r, ids in enumerate(chunk):
                inputs[r, : 1 + len(ids)] = [tok.bos_id, *ids]
            with sharding_context(self.model.mesh):
                states = np.asarray(jax.device_get(self._hidden(self.model.params, inputs)))
            for r, ids in enumerate(chunk):
                tokens = states[r, 1 : 1 + len(ids)]  # the text's tokens, BOS left out
                out[first + r] = tokens.mean(axis=0) if pooling == "mean" else tokens[-1]
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out
