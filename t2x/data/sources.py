"""Raw documents from text, JSONL or TFRecord files, TFDS, or the built-in corpus.

A ``Source`` is one split of one dataset, cut into a fixed number of logical shards. A
shard is a deterministic stream of raw records (``tf.string``) paired with the separator
bytes that followed each in its file: whole files, balanced by size, go to a shard when
there are at least as many files as shards. With fewer files, line-based uncompressed
files (text, JSONL, TSV) are cut into ``num_shards`` equal byte ranges of their
concatenation, each shard reading the lines that begin in its range, so every byte is
read once per epoch; other files (gzip, TFRecord, a file per document) cannot be cut
there, and every shard reads all of them and keeps every ``num_shards``-th record.
Records become text in Python (``decode_records``), which counts and skips or repairs
bad input instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from t2x.config import DataConfig
from t2x.data.reader import DataError, DataStats, dataset_options, records_dataset, splittable

log = logging.getLogger(__name__)

FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".tfrecord": "tfrecord", ".tfrecords": "tfrecord"}


def _strip_gz(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def detect_format(files: Sequence[str], configured: str, key: str, pairs: bool = False) -> str:
    """``text``, ``jsonl`` or ``tfrecord`` (with ``pairs``, also ``tsv``): the configured
    format, or the files' common suffix."""
    if configured != "auto":
        return configured
    formats = set()
    suffixes = {**FORMATS_BY_SUFFIX, ".tsv": "tsv"} if pairs else FORMATS_BY_SUFFIX
    for f in files:
        name = os.path.basename(_strip_gz(f))
        fmt = "text"
        for suffix, candidate in suffixes.items():
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


def byte_ranges(sizes: Sequence[int], num_shards: int) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenation of files of ``sizes`` bytes into ``num_shards`` ranges of
    equal bytes (to within one).

    Returns:
      For each shard, its pieces ``(file index, start, end)``: byte offsets within the
      file, in file order.
    """
    total = sum(sizes)
    bounds = [total * k // num_shards for k in range(num_shards + 1)]
    shards: list[list[tuple[int, int, int]]] = []
    for k in range(num_shards):
        pieces, offset = [], 0
        for i, size in enumerate(sizes):
            lo, hi = max(bounds[k], offset), min(bounds[k + 1], offset + size)
            if lo < hi:
                pieces.append((i, lo - offset, hi - offset))
            offset += size
        shards.append(pieces)
    return shards


def _example_text(payload: bytes, text_key: str) -> bytes | None:
    """The bytes feature ``text_key`` of a serialized ``tf.train.Example``, or None."""
    try:
        feature = tf.train.Example.FromString(payload).features.feature
    except Exception:  # protobuf's DecodeError, which its public API does not export
        return None
    if text_key not in feature or not feature[text_key].bytes_list.value:
        return None
    return feature[text_key].bytes_list.value[0]


def decode_records(
    records: Sequence[bytes],
    separators: Sequence[int],
    fmt: str,
    text_key: str,
    invalid_utf8: str,
    stats: DataStats | None = None,
    where: str = "data",
    target_key: str | None = None,
) -> tuple[list, list[int]]:
    """Turn raw records into document texts, dropping what cannot be read.

    Args:
      records: raw bytes: a text document, a JSONL line, a serialized ``tf.train.Example``,
        or the text of a TFDS example.
      separators: bytes that followed each record in its file (a line's newline).
      fmt: ``text``, ``jsonl``, ``tfrecord`` or ``tfds``.
      text_key: field holding the text in a JSONL object or Example.
      invalid_utf8: ``replace`` bad bytes with U+FFFD, or ``skip`` the document.
      stats: counters to update (and, when strict, the policy that raises).
      where: the data's description, for warnings.
      target_key: read input-target pairs: a JSONL object's ``text_key`` and
        ``target_key`` fields, or a TSV line's two columns.

    Returns:
      The document texts that are not blank (with ``target_key``, (input, target)
      pairs, neither blank), and the bytes of text each one's end stands for: the line
      separator for line-per-document text, 0 otherwise.
    """
    stats = stats or DataStats()
    texts, kept = [], []
    for raw, separator in zip(records, separators):
        if fmt == "tfrecord":
            raw = _example_text(raw, text_key)
            if raw is None:
                stats.problem("bad_records", f"{where}: a tf.train.Example without a bytes feature {text_key!r}", "skipped")
                continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            action = "skipped" if invalid_utf8 == "skip" else "repaired with U+FFFD"
            stats.problem("invalid_utf8", f"{where}: a document has bytes that are not UTF-8 ({e.reason} at byte {e.start})", action)
            if invalid_utf8 == "skip":
                continue
            text = raw.decode("utf-8", errors="replace")
        if target_key is not None:
            pair = _pair(text, fmt, text_key, target_key)
            if pair is None:
                what = (f"a JSONL line without string fields {text_key!r} and {target_key!r}" if fmt == "jsonl"
                        else "a TSV line without an input and a target column")
                stats.problem("bad_records", f"{where}: {what}", "skipped")
            elif pair[0].strip() and pair[1].strip():
                texts.append(pair)
                kept.append(0)
            continue
        if fmt == "jsonl":
            try:
                text = json.loads(text)[text_key]
            except (ValueError, KeyError, TypeError, IndexError):
                text = None
            if not isinstance(text, str):
                stats.problem("bad_records", f"{where}: a JSONL line that is not an object with a string field {text_key!r}", "skipped")
                continue
        if text.strip():
            texts.append(text)
            kept.append(int(separator) if fmt == "text" else 0)  # a JSONL line's newline is not text
    stats.add_documents(len(texts))
    return texts, kept


def _pair(text: str, fmt: str, text_key: str, target_key: str) -> tuple[str, str] | None:
    """(input, target) of a JSONL object or a TSV line, or None."""
    if fmt == "tsv":
        columns = text.split("\t")
        return (columns[0], columns[1]) if len(columns) == 2 else None
    try:
        record = json.loads(text)
        pair = record[text_key], record[target_key]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return pair if all(isinstance(x, str) for x in pair) else None


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
        self.format = detect_format(self.files, cfg.format, key, pairs=cfg.target_key is not None)
        if cfg.target_key is not None and self.format not in ("jsonl", "tsv"):
            raise DataError(f"{key}: input-target pairs (data.target_key) come from jsonl or tsv files, not {self.format}")
        self.description = f"{key} ({len(self.files)} file{'s' if len(self.files) != 1 else ''})"
        self.sizes = [tf.io.gfile.stat(f).length for f in self.files]
        pairs = [f"target:{cfg.target_key}"] if cfg.target_key is not None else []
        self.fingerprint = _fingerprint(
            [self.format, cfg.text_unit, cfg.text_key, *pairs,
             *(f"{os.path.basename(f)}:{n}" for f, n in zip(self.files, self.sizes))]
        )

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

    @property
    def _kind(self) -> str:
        return "file" if self.format == "text" and self.cfg.text_unit == "file" else self.format

    def _read(self, files: tf.Tensor, stats: DataStats, ranges: tf.Tensor | None = None) -> tf.data.Dataset:
        return records_dataset(files, self._kind, self.cfg.max_document_bytes, stats, ranges)

    def splits_files(self, num_shards: int) -> bool:
        """Whether ``num_shards`` shards read byte ranges of the files (fewer files than
        shards, all of them line-based and uncompressed)."""
        return (self.format != "tfds" and len(self.files) < num_shards
                and all(splittable(f, self._kind) for f in self.files))

    def shard_fn(self, index: int, num_shards: int, seed: int, shuffle_files: bool, stats: DataStats) -> Callable:
        """A function ``epoch -> tf.data.Dataset`` of ``(record, separator_bytes)`` of
        logical shard ``index``.

        With ``shuffle_files`` the order of the shard's files changes with each epoch
        (seeded); the records themselves are shuffled later, in the pipeline. Problems
        met while reading are counted in ``stats``.
        """
        if self.format == "tfds":
            import tensorflow_datasets as tfds

            split = tfds.even_splits(self._tfds_split, n=num_shards)[index]
            records = self._tfds_builder.as_dataset(split=split, shuffle_files=False)
            text_key = self.cfg.text_key

            def text_of(example):
                return example[text_key], tf.constant(0, tf.int32)

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
                return self._read(ordered, stats)

            return read_shard

        if self.splits_files(num_shards):
            pieces = byte_ranges(self.sizes, num_shards)[index]
            paths = tf.constant([self.files[i] for i, _, _ in pieces], tf.string)
            spans = tf.constant(np.array([[lo, hi] for _, lo, hi in pieces], np.int64).reshape(-1, 2))

            def read_ranges(epoch):
                if not shuffle_files:
                    return self._read(paths, stats, spans)
                order = tf.random.experimental.stateless_shuffle(
                    tf.range(len(pieces)), seed=tf.stack([tf.constant(seed + 7919 * index, tf.int64), tf.cast(epoch, tf.int64)])
                )
                return self._read(tf.gather(paths, order), stats, tf.gather(spans, order))

            return read_ranges

        all_files = tf.constant(self.files)
        return lambda epoch: self._read(all_files, stats).shard(num_shards, index)


def _fingerprint(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_texts(paths: Sequence[str], fmt: str = "auto", text_key: str = "text") -> Iterator[str]:
    """Every document in the files (for tokenizer training), bad records skipped."""
    cfg = DataConfig(source="files", train_files=tuple(paths), format=fmt, text_key=text_key)
    source = Source(cfg, "train")
    stats = DataStats()
    records = source.shard_fn(0, 1, seed=0, shuffle_files=False, stats=stats)(0).batch(1024)
    records = records.with_options(dataset_options())
    for batch, separators in records.as_numpy_iterator():
        yield from decode_records(list(batch), separators, source.format, text_key, "replace", stats, source.description)[0]
