"""BERT's next-sentence pairs: ``[CLS] A [SEP] B [SEP]``, B the text after A or a random one.

Each document is cut into pieces that fit a row; a piece is split at a random token into
A and B. Half the pairs (drawn) keep that B ("is next", label 0); the others take, as B,
as many tokens from a random place in another document of the block ("random", label
1). Pairs are packed whole into rows, each pair its own segment, with token types 0 for
``[CLS] A [SEP]`` and 1 for ``B [SEP]``; the label stands at every token of its pair.
The draws come from a generator seeded by the data position, so a resumed run makes the
same pairs.
"""

from __future__ import annotations

import numpy as np

from t2x.data.packing import RowFormat

FEATURES = ("tokens", "segment_ids", "positions", "token_types", "next_sentence", "num_bytes")
IS_NEXT, RANDOM = 0, 1


def sentence_pairs(documents, token_bytes, seq_len: int, tokenizer, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The rows of the pairs drawn from ``documents`` (one block); arguments as
    ``RowFormat.pack`` takes them."""
    budget = seq_len - 3  # [CLS], [SEP], [SEP]
    docs = [np.asarray(d, np.int32) for d in documents]
    sizes = [np.asarray(b, np.int64) for b in token_bytes]
    others = [i for i, d in enumerate(docs) if len(d)]
    pairs = []
    for i, doc in enumerate(docs):
        for start in range(0, len(doc), budget):
            piece = doc[start:start + budget]
            if len(piece) < 2:
                continue
            cut = int(rng.integers(1, len(piece)))
            a, b = piece[:cut], piece[cut:]
            a_bytes = int(sizes[i][start:start + cut].sum())
            b_bytes = int(sizes[i][start + cut:start + len(piece)].sum())
            label = IS_NEXT
            candidates = [j for j in others if j != i]
            if rng.random() < 0.5 and candidates:
                j = candidates[int(rng.integers(len(candidates)))]
                at = int(rng.integers(len(docs[j])))
                b = docs[j][at:at + len(b)]
                b_bytes, label = int(sizes[j][at:at + len(b)].sum()), RANDOM
            pairs.append((a, b, label, a_bytes + b_bytes))
    return _pack(pairs, seq_len, tokenizer.bos_id, tokenizer.eos_id)


def _pack(pairs, seq_len: int, bos: int, eos: int) -> dict[str, np.ndarray]:
    rows: list[list] = []
    used = seq_len  # start a row at the first pair
    for pair in pairs:
        length = len(pair[0]) + len(pair[1]) + 3
        if used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(pair)
        used += length
    out = {name: np.zeros((len(rows), seq_len), np.int32) for name in FEATURES[:-1]}
    out["num_bytes"] = np.zeros(len(rows), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for segment, (a, b, label, size) in enumerate(row, start=1):
            tokens = np.concatenate([[bos], a, [eos], b, [eos]])
            span = slice(at, at + len(tokens))
            out["tokens"][r, span] = tokens
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(len(tokens))
            out["token_types"][r, span] = np.arange(len(tokens)) > len(a) + 1
            out["next_sentence"][r, span] = label
            out["num_bytes"][r] += size
            at += len(tokens)
    return out


SENTENCE_PAIRS = RowFormat(FEATURES, sentence_pairs)
