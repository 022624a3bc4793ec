"""Raw documents from text, JSONL or TFRecord files, TFDS, or the built-in corpus.

A ``Source`` is one split of one dataset, cut into a fixed number of logical shards. A
shard is a deterministic stream of raw records (``tf.string``): whole files, balanced by
size, go to a shard when there are at least as many files as shards; otherwise every
shard reads all files and keeps every ``num_shards``-th record. Records become text in Python
(``decode_records``), which counts and skips or repairs bad input instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import tensorflow as tf

from t2x.config import DataConfig

log = logging.getLogger(__name__)

FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".tfrecord": "tfrecord", ".tfrecords": "tfrecord"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the config key or file."""


class DataStats:
    """Counts of documents read and of bad records met, shared by pipeline threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.documents = 0
        self.invalid_utf8 = 0  # documents with bytes that are not UTF-8 (replaced or skipped)
        self.bad_records = 0  # JSONL lines that are not JSON objects with a text field

    def add(self, documents: int = 0, invalid_utf8: int = 0, bad_records: int = 0) -> None:
        with self._lock:
            self.documents += documents
            self.invalid_utf8 += invalid_utf8
            self.bad_records += bad_records

    def reset(self) -> None:
        with self._lock:
            self.documents = self.invalid_utf8 = self.bad_records = 0

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"documents": self.documents, "invalid_utf8": self.invalid_utf8, "bad_records": self.bad_records}


def _strip_gz(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def detect_format(files: Sequence[str], configured: str, key: str) -> str:
    """``text``, ``jsonl`` or ``tfrecord``: the configured format, or the files' common suffix."""
    if configured != "auto":
        return configured
    formats = set()
    for f in files:
        name = os.path.basename(_strip_gz(f))
        fmt = "text"
        for suffix, candidate in FORMATS_BY_SUFFIX.items():
            if name.endswith(suffix) or f"{suffix}-" in name:
                fmt = candidate
        formats.add(fmt)
    if len(formats) > 1:
        raise DataError(f"{key} mixes file formats {sorted(formats)}; use one format or set data.format")
    return formats.pop()


def list_files(patterns: Sequence[str], key: str) -> list[str]:
    """Sorted files matching the globs (local or any filesystem tf.io.gfile knows)."""
    if not patterns:
        raise DataError(f"{key} is empty: name the files to read (globs are allowed)")
    files = []
    for pattern in patterns:
        matches = tf.io.gfile.glob(pattern)
        if not matches:
            raise DataError(f"{key}: no file matches {pattern!r}")
        files.extend(m for m in matches if not tf.io.gfile.isdir(m))
    if not files:
        raise DataError(f"{key}: {list(patterns)} matches only directories")
    return sorted(set(files))


def assign_files(sizes: Sequence[int], num_shards: int) -> list[list[int]]:
    """Deal files to shards, largest first, each to the shard with the fewest bytes so far.

    Every shard supplies the same number of rows per step, so shards of unequal size
    repeat their documents at unequal rates; balancing by bytes keeps that small.

    Returns:
      For each shard, the indices of its files in their original (sorted) order.
    """
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    totals = [0] * num_shards
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = min(range(num_shards), key=lambda k: (totals[k], k))
        shards[k].append(i)
        totals[k] += sizes[i]
    return [sorted(files) for files in shards]


def decode_records(
    records: Sequence[bytes], fmt: str, text_key: str, invalid_utf8: str, stats: DataStats | None = None
) -> list[str]:
    """Turn raw records into document texts, dropping what cannot be read.

    Args:
      records: raw bytes: a text document, a JSONL line, or the text field of an Example.
      fmt: ``text``, ``jsonl``, ``tfrecord`` or ``tfds``.
      text_key: field holding the text in a JSONL object.
      invalid_utf8: ``replace`` bad bytes with U+FFFD, or ``skip`` the document.
      stats: counters to update.

    Returns:
      The non-empty document texts, in order.
    """
    texts, invalid, bad = [], 0, 0
    for raw in records:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            invalid += 1
            if invalid_utf8 == "skip":
                continue
            text = raw.decode("utf-8", errors="replace")
        if fmt == "jsonl":
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
                text = obj[text_key]
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if not isinstance(text, str):
                bad += 1
                continue
        if text:
            texts.append(text)
    if stats is not None:
        stats.add(documents=len(texts), invalid_utf8=invalid, bad_records=bad)
    return texts


class Source:
    """One split of the configured dataset, readable as logical shards.

    Args:
      cfg: data config.
      split: ``train`` or ``eval``.
    """

    def __init__(self, cfg: DataConfig, split: str):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.cfg = cfg
        self.split = split
        self.files: list[str] = []
        if cfg.source == "tfds":
            self.format = "tfds"
            self._tfds_split = cfg.train_split if split == "train" else cfg.eval_split
            self.description = f"TFDS {cfg.tfds_name} split {self._tfds_split!r}"
            self._tfds_builder = self._load_tfds_builder()
            self.fingerprint = _fingerprint([cfg.tfds_name, str(self._tfds_builder.info.version), self._tfds_split, cfg.text_key])
            return
        if cfg.source == "builtin":
            from t2x.data import corpus

            self.files = [corpus.split_file("train" if split == "train" else "validation")]
            key = "built-in corpus"
        else:
            key = "data.train_files" if split == "train" else "data.eval_files"
            self.files = list_files(cfg.train_files if split == "train" else cfg.eval_files, key)
        self.format = detect_format(self.files, cfg.format, key)
        self.description = f"{key} ({len(self.files)} file{'s' if len(self.files) != 1 else ''})"
        self.sizes = [tf.io.gfile.stat(f).length for f in self.files]
        self.fingerprint = _fingerprint(
            [self.format, cfg.text_unit, cfg.text_key, *(f"{os.path.basename(f)}:{n}" for f, n in zip(self.files, self.sizes))]
        )
        if self.format == "text" and cfg.text_unit == "file" and any(f.endswith(".gz") for f in self.files):
            raise DataError(f"{key}: data.text_unit=file reads files whole and cannot read .gz files")
        compressions = {f.endswith(".gz") for f in self.files}
        if len(compressions) > 1:
            raise DataError(f"{key} mixes .gz and uncompressed files; use one kind")
        self._compression = "GZIP" if compressions.pop() else ""

    def _load_tfds_builder(self):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(self.cfg.tfds_name, data_dir=self.cfg.tfds_data_dir)
            builder.as_dataset(split=self._tfds_split, shuffle_files=False)
        except Exception as e:  # TFDS raises many types for unknown, unprepared or unsplit datasets
            key = "data.train_split" if self.split == "train" else "data.eval_split"
            raise DataError(
                f"cannot read {self.description} (data.tfds_name, {key}, data.tfds_data_dir): {e}"
            ) from None
        return builder

    def _assignment(self, num_shards: int) -> list[list[int]]:
        if getattr(self, "_assigned", (None,))[0] != num_shards:
            shards = assign_files(self.sizes, num_shards)
            totals = [sum(self.sizes[i] for i in files) for files in shards]
            if min(totals) and max(totals) > 1.5 * min(totals):
                log.warning(
                    "%s: the largest of %d data shards holds %.1fx the bytes of the smallest, so its documents "
                    "are seen that much less often; use more, similar-sized files", self.description, num_shards,
                    max(totals) / min(totals),
                )
            self._assigned = (num_shards, shards)
        return self._assigned[1]

    def _read(self, files: tf.Tensor) -> tf.data.Dataset:
        cfg = self.cfg
        if self.format == "tfrecord":

            def text_of(record):
                features = {cfg.text_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
                return tf.io.parse_single_example(record, features)[cfg.text_key]

            return tf.data.TFRecordDataset(files, compression_type=self._compression).map(text_of)
        if self.format == "text" and cfg.text_unit == "file":
            return tf.data.Dataset.from_tensor_slices(files).map(tf.io.read_file)
        return tf.data.TextLineDataset(files, compression_type=self._compression)

    def shard_fn(self, index: int, num_shards: int, seed: int, shuffle_files: bool) -> Callable:
        """A function ``epoch -> tf.data.Dataset`` of the raw records of logical shard ``index``.

        With ``shuffle_files`` the order of the shard's files changes with each epoch
        (seeded); the records themselves are shuffled later, in the pipeline.
        """
        if self.format == "tfds":
            import tensorflow_datasets as tfds

            split = tfds.even_splits(self._tfds_split, n=num_shards)[index]
            records = self._tfds_builder.as_dataset(split=split, shuffle_files=False)
            text_key = self.cfg.text_key

            def text_of(example):
                return example[text_key]

            records = records.map(text_of)
            return lambda epoch: records

        if len(self.files) >= num_shards:
            files = tf.constant([self.files[i] for i in self._assignment(num_shards)[index]])

            def read_shard(epoch):
                ordered = files
                if shuffle_files:
                    ordered = tf.random.experimental.stateless_shuffle(
                        files, seed=tf.stack([tf.constant(seed + 7919 * index, tf.int64), tf.cast(epoch, tf.int64)])
                    )
                return self._read(ordered)

            return read_shard

        all_files = tf.constant(self.files)
        return lambda epoch: self._read(all_files).shard(num_shards, index)


def _fingerprint(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_texts(paths: Sequence[str], fmt: str = "auto", text_key: str = "text") -> Iterator[str]:
    """Every document in the files (for tokenizer training), bad records skipped."""
    cfg = DataConfig(source="files", train_files=tuple(paths), format=fmt, text_key=text_key)
    source = Source(cfg, "train")
    records = source.shard_fn(0, 1, seed=0, shuffle_files=False)(0).batch(1024)
    for batch in records.as_numpy_iterator():
        yield from decode_records(list(batch), source.format, text_key, "replace")
