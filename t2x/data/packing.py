"""Pack tokenized documents into fixed-length rows with segment ids and positions.

Documents (each followed by EOS) are laid end to end and cut every ``seq_len`` tokens, so
rows carry no padding except the last one of a block. A document cut at a row boundary
continues in the next row as a new segment. Segment ids number the pieces in a row
from 1 (0 is padding); positions count from 0 in each piece; attention masks built from
segment ids keep every piece to itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


def pack_documents(
    documents: list[list[int]], token_bytes: list[np.ndarray], seq_len: int, eos_id: int
) -> dict[str, np.ndarray]:
    """Concatenate-and-split packing.

    Args:
      documents: token ids of each document, without EOS.
      token_bytes: for each document, the bytes of text each of its tokens stands for,
        followed by the bytes its EOS stands for (the separator that ended it in its
        file): ``len(documents[i]) + 1`` integers.
      seq_len: tokens per row.
      eos_id: appended to every document.

    Returns:
      ``tokens``, ``segment_ids``, ``positions``: int32 [rows, seq_len], and
      ``num_bytes``: int32 [rows], the bytes of text the row's tokens stand for, so that
      any set of whole rows counts exactly the bytes of the tokens in it.
    """
    if not documents:
        empty = np.zeros((0, seq_len), np.int32)
        return {"tokens": empty, "segment_ids": empty, "positions": empty, "num_bytes": np.zeros((0,), np.int32)}
    lengths = np.array([len(d) + 1 for d in documents], np.int64)
    total = int(lengths.sum())
    num_rows = -(-total // seq_len)
    flat = np.zeros(num_rows * seq_len, np.int32)
    flat[:total] = np.concatenate([np.append(np.asarray(d, np.int32), eos_id) for d in documents])
    doc_of = np.full(num_rows * seq_len, -1, np.int64)
    doc_of[:total] = np.repeat(np.arange(len(documents)), lengths)

    tokens = flat.reshape(num_rows, seq_len)
    doc_of = doc_of.reshape(num_rows, seq_len)
    columns = np.arange(seq_len)
    # A piece starts at column 0 or where the document changes.
    starts = np.ones_like(doc_of, dtype=bool)
    starts[:, 1:] = doc_of[:, 1:] != doc_of[:, :-1]
    padding = doc_of < 0
    segment_ids = np.where(padding, 0, np.cumsum(starts, axis=1)).astype(np.int32)
    start_column = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
    positions = np.where(padding, 0, columns - start_column).astype(np.int32)

    flat_bytes = np.zeros(num_rows * seq_len, np.int64)
    flat_bytes[:total] = np.concatenate(token_bytes)
    row_bytes = flat_bytes.reshape(num_rows, seq_len).sum(axis=1)
    return {
        "tokens": tokens,
        "segment_ids": segment_ids,
        "positions": positions,
        "num_bytes": row_bytes.astype(np.int32),
    }


TEXT_FEATURES = ("tokens", "segment_ids", "positions", "num_bytes")


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """How a family's tokenized documents become rows (``t2x.families``).

    Attributes:
      features: names of the row features ``pack`` returns; each is int32 [seq_len]
        (or [lengths[name]]), except ``num_bytes`` (int32 per row). ``segment_ids`` is 0
        on padding.
      pack: ``(documents, token_bytes, seq_len, tokenizer, rng) -> rows`` (one array per
        feature) for the documents of one block; ``documents`` and ``token_bytes`` as
        ``pack_documents`` takes them, ``rng`` a generator seeded by the block's place in
        the data (for objectives that draw, such as span corruption). With
        ``data.target_key`` (input-target pairs) it also gets ``targets``, the tokenized
        target of each document.
      lengths: features whose rows are not ``data.seq_len`` long, and their lengths.
    """

    features: tuple[str, ...]
    pack: Callable[..., dict[str, np.ndarray]]
    lengths: dict[str, int] = dataclasses.field(default_factory=dict)

    def shape(self, name: str, seq_len: int) -> list[int]:
        """The per-row shape of feature ``name``."""
        return [] if name == "num_bytes" else [self.lengths.get(name, seq_len)]


def _documents(documents, token_bytes, seq_len: int, tokenizer, rng) -> dict[str, np.ndarray]:
    return pack_documents(documents, token_bytes, seq_len, tokenizer.eos_id)


def _bos_documents(documents, token_bytes, seq_len: int, tokenizer, rng) -> dict[str, np.ndarray]:
    return pack_documents([[tokenizer.bos_id, *d] for d in documents],
                          [np.concatenate([[0], b]) for b in token_bytes], seq_len, tokenizer.eos_id)


DOCUMENTS = RowFormat(TEXT_FEATURES, _documents)  # text EOS (decoders: BOS comes from the objective)
BOS_DOCUMENTS = RowFormat(TEXT_FEATURES, _bos_documents)  # BOS text EOS (encoders: [CLS] text [SEP])
