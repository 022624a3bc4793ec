"""T5's span corruption, and packing of (input, target) pairs into encoder and decoder rows.

A document's tokens are cut into pieces of ``raw_length`` tokens. In each piece a share
``noise_density`` of the tokens, in spans of ``mean_span_length`` on average, is noise:
the input keeps the other tokens, each noise span replaced by one sentinel token, and
ends with EOS; the target is each sentinel followed by the tokens it replaced, then EOS
(T5's ``random_spans_noise_mask``, ``noise_span_to_unique_sentinel`` and
``nonnoise_span_to_unique_sentinel``). The draws come from a generator seeded by the
data position, so a resumed run corrupts exactly as the uninterrupted run did.

Pairs are packed greedily: a pair joins the current row while both its input fits the
encoder row (``seq_len``) and its target the decoder row (``target_len``); the pair's
segment id is the same in both rows, which the cross-attention mask relies on.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """bool [length]: which tokens are noise. Noise and non-noise alternate in spans,
    starting with non-noise; ``round(length * density)`` tokens (at least 1, at most
    ``length - 1``) in ``round(noise / mean_span)`` spans (at least 1) of random lengths."""
    noise, spans = _counts(length, density, mean_span)
    spans = min(spans, noise, length - noise)

    def segment(total: int) -> np.ndarray:  # ``spans`` random positive lengths adding up to ``total``
        cuts = np.sort(rng.choice(np.arange(1, total), spans - 1, replace=False)) if spans > 1 else np.zeros(0, int)
        return np.diff(np.concatenate([[0], cuts, [total]]))

    lengths = np.stack([segment(length - noise), segment(noise)], axis=1).reshape(-1)  # keep, noise, keep, ...
    return np.repeat(np.tile([False, True], spans), lengths)


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of ``tokens`` with noise ``mask``: the input with noise span k
    replaced by ``sentinels[k]``, the target each noise span after its sentinel; both
    end with EOS."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    span = np.cumsum(starts) - 1  # the noise span a token is in
    inputs = np.where(starts, sentinels[np.maximum(span, 0)], tokens)[~mask | starts]
    noise = np.flatnonzero(mask)
    first = np.flatnonzero(starts[noise])  # where each span starts among the noise tokens
    targets = np.insert(tokens[noise], first, sentinels[: len(first)])
    return np.append(inputs, eos).astype(np.int32), np.append(targets, eos).astype(np.int32)


def _counts(raw: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a piece of ``raw`` tokens, as T5 counts them."""
    noise = min(max(int(round(raw * density)), 1), raw - 1)
    return noise, max(int(round(noise / mean_span)), 1)


def corrupted_lengths(raw: int, density: float, mean_span: float) -> tuple[int, int]:
    """Input and target lengths (EOS included) of a piece of ``raw`` tokens."""
    noise, spans = _counts(raw, density, mean_span)
    return raw - noise + spans + 1, noise + spans + 1


def raw_length(seq_len: int, target_len: int | None, density: float, mean_span: float) -> int:
    """The longest piece whose input fits ``seq_len`` and target ``target_len`` (None:
    any) (T5's ``random_spans_helper``)."""
    raw = 2
    while True:
        inputs, targets = corrupted_lengths(raw + 1, density, mean_span)
        if inputs > seq_len or (target_len is not None and targets > target_len):
            return raw
        raw += 1


def noise_spans(raw: int, density: float, mean_span: float) -> int:
    """Noise spans of a piece of ``raw`` tokens: the sentinels a piece needs, at most."""
    return _counts(raw, density, mean_span)[1]


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """Span corruption into rows of ``seq_len`` input and ``target_len`` target tokens;
    sentinel k is id ``first_sentinel + k`` (ids past the tokenizer's vocabulary), or
    ``own_sentinels[k]`` when given (the tokenizer's own ``<extra_id_k>``, as many as a
    piece may use or more)."""

    density: float
    mean_span: float
    seq_len: int
    target_len: int
    first_sentinel: int = 0
    own_sentinels: tuple[int, ...] = ()

    def __post_init__(self):
        if self.own_sentinels and len(self.own_sentinels) < self.sentinels:
            raise ValueError(f"{len(self.own_sentinels)} sentinels given; a piece may use {self.sentinels}")

    @property
    def raw_length(self) -> int:
        return raw_length(self.seq_len, self.target_len, self.density, self.mean_span)

    @property
    def sentinels(self) -> int:
        """Sentinel ids a piece may use."""
        return noise_spans(self.raw_length, self.density, self.mean_span)

    @property
    def sentinel_ids(self) -> np.ndarray:
        """int32 [sentinels]: the id of sentinel k, for each k a piece may use."""
        if self.own_sentinels:
            return np.asarray(self.own_sentinels[: self.sentinels], np.int32)
        return np.arange(self.first_sentinel, self.first_sentinel + self.sentinels, dtype=np.int32)

    def pack(self, documents, token_bytes, rng: np.random.Generator, eos_id: int) -> dict[str, np.ndarray]:
        """Encoder and decoder rows of the corrupted pieces of ``documents``: ``tokens``,
        ``segment_ids``, ``positions`` [rows, seq_len]; ``targets``,
        ``target_segment_ids``, ``target_positions`` [rows, target_len]; ``num_bytes``
        [rows], the bytes of text of the pieces in the row."""
        raw, sentinels = self.raw_length, self.sentinel_ids
        pairs = []
        for doc, sizes in zip(documents, token_bytes):
            doc = np.asarray(doc, np.int32)
            for start in range(0, len(doc), raw):
                piece = doc[start:start + raw]
                if len(piece) < 2:  # one token cannot be split into noise and non-noise
                    continue
                mask = noise_mask(len(piece), self.density, self.mean_span, rng)
                end = start + raw if start + raw < len(doc) else len(sizes)  # the last piece takes the EOS's bytes
                pairs.append((*corrupt(piece, mask, sentinels, eos_id), int(np.sum(sizes[start:end]))))
        return pack_pairs(pairs, self.seq_len, self.target_len)


def pack_pairs(pairs: list[tuple[np.ndarray, np.ndarray, int]], seq_len: int, target_len: int) -> dict[str, np.ndarray]:
    """Greedy packing of (input, target, bytes) pairs into encoder and decoder rows (see
    the module docstring); an input or target longer than its row is cut."""
    rows: list[list] = []
    used = (seq_len, target_len)  # start a row at the first pair
    for inputs, targets, size in pairs:
        inputs, targets = inputs[:seq_len], targets[:target_len]
        if used[0] + len(inputs) > seq_len or used[1] + len(targets) > target_len:
            rows.append([])
            used = (0, 0)
        rows[-1].append((inputs, targets, size))
        used = (used[0] + len(inputs), used[1] + len(targets))
    out = {name: np.zeros((len(rows), length), np.int32) for name, length in (
        ("tokens", seq_len), ("segment_ids", seq_len), ("positions", seq_len),
        ("targets", target_len), ("target_segment_ids", target_len), ("target_positions", target_len))}
    out["num_bytes"] = np.zeros(len(rows), np.int32)
    for r, row in enumerate(rows):
        at = [0, 0]
        for segment, (inputs, targets, size) in enumerate(row, start=1):
            for side, (values, prefix) in enumerate(((inputs, ""), (targets, "target_"))):
                span = slice(at[side], at[side] + len(values))
                out["tokens" if side == 0 else "targets"][r, span] = values
                out[f"{prefix}segment_ids"][r, span] = segment
                out[f"{prefix}positions"][r, span] = np.arange(len(values))
                at[side] += len(values)
            out["num_bytes"][r] += size
    return out
