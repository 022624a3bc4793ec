"""Labelled examples for classification: read, checked, tokenized, and cut into batches.

Fine-tuning sets are small next to pretraining corpora, so each process reads and
tokenizes a whole split once and keeps it in memory as rows, one example per row:
BOS text EOS, cut to ``data.seq_len`` and padded. The global batch at step ``s`` is a
fixed function of the seed and ``s`` (a new permutation of the examples each epoch), so
a resumed run needs no iterator state to read exactly what the uninterrupted run would
have, and any process count sees the same batches; each process keeps its own rows.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections.abc import Sequence

import numpy as np

from t2x.config import Config
from t2x.data.reader import DataError, DataStats
from t2x.data.tokenizer import Tokenizer

FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclasses.dataclass(frozen=True)
class LabelledRows:
    """One split, tokenized: ``tokens`` int32 [examples, seq_len] (0-padded), ``lengths``
    int32 [examples] and ``labels`` int32 [examples] (indices into ``classify.labels``)."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    truncated: int  # examples longer than a row, cut
    description: str
    fingerprint: str  # of the examples' text and labels

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The batch features of the examples at ``indices`` (-1: a padding row, label -1)."""
        real = indices >= 0
        take = np.where(real, indices, 0)
        lengths = np.where(real, self.lengths[take], 0)
        columns = np.arange(self.tokens.shape[1])
        inside = columns[None, :] < lengths[:, None]
        return {
            "tokens": np.where(inside, self.tokens[take], 0).astype(np.int32),
            "segment_ids": inside.astype(np.int32),
            "positions": np.where(inside, columns[None, :], 0).astype(np.int32),
            "labels": np.where(real, self.labels[take], -1).astype(np.int32),
        }


def _format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    for suffix, fmt in FORMATS_BY_SUFFIX.items():
        if path.endswith(suffix):
            return fmt
    raise DataError(f"{path}: cannot tell labelled examples' format from its name; set data.format to jsonl, csv or tsv")


def _file_examples(path: str, fmt: str, text_key: str, label_key: str):
    """(text, label, where) of each record of a JSONL, CSV or TSV file."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        content = f.read().decode("utf-8", errors="replace")
    if fmt == "jsonl":
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except ValueError:
                raise DataError(f"{where} is not JSON") from None
            if not isinstance(record, dict) or text_key not in record or label_key not in record:
                raise DataError(f"{where} lacks the field {text_key!r} (data.text_key) or {label_key!r} "
                                "(classify.label_key)")
            yield record[text_key], record[label_key], where
        return
    if fmt not in ("csv", "tsv"):
        raise DataError(f"data.format={fmt} does not hold labelled examples; use jsonl, csv or tsv")
    reader = csv.DictReader(io.StringIO(content), delimiter="," if fmt == "csv" else "\t")
    missing = [k for k in (text_key, label_key) if k not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r} (its header: {reader.fieldnames}); set data.text_key "
                        "and classify.label_key to its text and label columns")
    for number, row in enumerate(reader, start=2):
        yield row[text_key], row[label_key], f"{path} line {number}"


def _tfds_examples(cfg: Config, split: str):
    import tensorflow_datasets as tfds

    name = cfg.data.tfds_name
    try:
        builder = tfds.builder(name, data_dir=cfg.data.tfds_data_dir)
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except Exception as e:  # TFDS raises many types for unknown, unprepared or unsplit datasets
        raise DataError(f"cannot read TFDS {name} split {split!r}: {e}") from None
    feature = builder.info.features[cfg.classify.label_key] if cfg.classify.label_key in builder.info.features else None
    names = getattr(feature, "names", None)  # a ClassLabel's names: its integers are indices into them
    for number, example in enumerate(tfds.as_numpy(dataset)):
        text, label = example[cfg.data.text_key], example[cfg.classify.label_key]
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        label = label.decode("utf-8") if isinstance(label, bytes) else (names[int(label)] if names else label)
        yield text, label, f"TFDS {name} {split} example {number}"


def read_labelled(cfg: Config, split: str, tokenizer: Tokenizer) -> LabelledRows:
    """The labelled examples of ``split`` (``train`` or ``eval``), tokenized into rows.

    Raises:
      DataError: no files or examples, a record without the text or label field, a
        label not in ``classify.labels`` (named, with where it is), or no usable text.
    """
    d, labels = cfg.data, cfg.classify.labels
    index = {label: i for i, label in enumerate(labels)}
    if d.source == "tfds":
        tfds_split = d.train_split if split == "train" else d.eval_split
        examples = _tfds_examples(cfg, tfds_split)
        description = f"TFDS {d.tfds_name} split {tfds_split!r}"
    elif d.source == "files":
        from t2x.data.sources import list_files

        key = "data.train_files" if split == "train" else "data.eval_files"
        files = list_files(d.train_files if split == "train" else d.eval_files, key)
        examples = (e for f in files for e in _file_examples(f, _format(f, d.format), d.text_key, cfg.classify.label_key))
        description = f"{key} ({len(files)} file{'s' if len(files) != 1 else ''})"
    else:
        raise DataError("classification reads labelled files or TFDS: set data.source=files (with data.train_files "
                        "and data.eval_files) or data.source=tfds")
    texts, ids, digest = [], [], hashlib.sha256()
    for text, label, where in examples:
        label = str(label)
        if label not in index:
            raise DataError(f"{where}: label {label!r} is not in classify.labels {list(labels)}; add it there or "
                            "correct the example")
        if not isinstance(text, str):
            raise DataError(f"{where}: the text field {d.text_key!r} is not a string")
        texts.append(text)
        ids.append(index[label])
        digest.update(f"{len(text)}:{text}\0{label}\0".encode())
    if not texts:
        raise DataError(f"{description} has no labelled examples")
    documents = tokenizer.encode(texts)
    room = d.seq_len - 2  # BOS and EOS
    tokens = np.zeros((len(texts), d.seq_len), np.int32)
    lengths = np.zeros(len(texts), np.int32)
    truncated = 0
    for i, ids_i in enumerate(documents):
        truncated += len(ids_i) > room
        row = [tokenizer.bos_id, *ids_i[:room], tokenizer.eos_id]
        tokens[i, : len(row)] = row
        lengths[i] = len(row)
    return LabelledRows(tokens, lengths, np.asarray(ids, np.int32), truncated, description, digest.hexdigest()[:16])


class LabelledBatches:
    """Training batches of this process's rows, step-indexed (see the module docstring).

    Args:
      rows: the training split.
      global_batch_size: examples per global batch.
      seed: the permutation seed (``train.seed``).
      process_rows: rows of the global batch this process holds (``process_rows``).
      start_step: the step the next batch is for (a resumed run's step).
    """

    @property
    def positions(self) -> dict:
        """No per-shard input position to checkpoint: batches follow from the step."""
        return {}

    def __init__(self, rows: LabelledRows, global_batch_size: int, seed: int, process_rows: Sequence[int],
                 start_step: int = 0):
        self.data, self.batch_size, self.seed = rows, global_batch_size, seed
        self.local = np.asarray(process_rows, np.int64)
        self.step = start_step
        self.stats = DataStats()  # bad examples stop the run before it starts: nothing to count here
        self._epoch, self._order = -1, None

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self.step * self.batch_size // len(self.data)

    def indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch at ``step``."""
        n = len(self.data)
        slots = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        out = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(slots // n):
            if epoch != self._epoch:
                self._epoch, self._order = epoch, np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            here = slots // n == epoch
            out[here] = self._order[slots[here] % n]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.data.rows(self.indices(self.step)[self.local])
        self.step += 1
        return batch

    def close(self) -> None:
        """Nothing runs in the background."""


def eval_batches(rows: LabelledRows, global_batch_size: int, process_rows: Sequence[int]):
    """This process's rows of every evaluation batch, each example once, in order; the
    last batch is padded with label -1 rows."""
    count = -(-len(rows) // global_batch_size)
    order = np.full(count * global_batch_size, -1, np.int64)
    order[: len(rows)] = np.arange(len(rows))
    local = np.asarray(process_rows, np.int64)
    for b in range(count):
        yield rows.rows(order[b * global_batch_size:(b + 1) * global_batch_size][local])

