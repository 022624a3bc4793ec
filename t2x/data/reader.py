"""Reading raw records from text, JSONL and TFRecord files, one file after another.

Records come out with the number of separator bytes that followed them in the file (a
line's newline, 1 or 2 bytes; 0 for a last line without one, a whole file or a
TFRecord), so that evaluation can count every byte of the text. Blank lines are not
records. Problems are counted in a ``DataStats`` and the record, or the rest of the
file, is skipped: a file that cannot be opened or read, a TFRecord whose checksum fails,
a document longer than ``max_document_bytes``. In strict mode each of them stops the
run instead.

Files are read through ``tf.io.gfile``, so ``gs://`` paths work like local ones, and
``.gz`` files are decompressed on the fly. A line-based file can be read in byte ranges
(``read_file``'s ``start`` and ``end``): a range holds the lines that begin inside it, so
ranges that tile a file read each of its lines exactly once.
"""

from __future__ import annotations

import gzip
import logging
import struct
import threading
from collections.abc import Iterator

import google_crc32c
import tensorflow as tf

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # bytes read at a time
_WARNINGS_PER_KIND = 3  # then the metrics alone count them


def dataset_options() -> tf.data.Options:
    """The options of every dataset t2x iterates."""
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_warm_start = True
    # Only the packer needs parallel calls (it says so). Maps tf.data would parallelize
    # on its own can leave an iterator that met an error unable to shut down.
    options.experimental_optimization.map_parallelization = False
    # No autotuning thread: it can miss the iterator's cancellation and keep a closing
    # pipeline waiting out its optimization period (up to a minute) at the end of a run.
    # The packer's parallelism then defaults to the host's cores; buffers are fixed.
    options.autotune.enabled = False
    return options


class DataError(ValueError):
    """Input data that cannot be used; the message names the config key or file."""


PROBLEMS = ("invalid_utf8", "bad_records", "corrupt_records", "unreadable_files", "oversized_documents")


class DataStats:
    """Documents read and problems met, shared by the pipeline's threads.

    Problems (``PROBLEMS``): documents that are not valid UTF-8 (repaired or skipped),
    records that are not a JSON object or Example with a string text field, TFRecords
    whose checksum fails, files that cannot be opened or read, and documents longer than
    ``data.max_document_bytes``. The first few of each kind are logged as warnings; with
    ``strict`` the first one raises ``DataError``.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("documents", *PROBLEMS), 0)
        self.bytes_read = 0  # from storage (compressed bytes of .gz files)
        self.first_error: DataError | None = None  # the problem that stopped a strict run

    def add_documents(self, count: int) -> None:
        with self._lock:
            self._counts["documents"] += count

    def problem(self, kind: str, what: str, done: str, count: int = 1) -> None:
        """Count ``count`` problems of ``kind``: ``what`` says where and what is wrong (the
        error, when strict), ``done`` what was done about it (for the warning)."""
        with self._lock:
            self._counts[kind] += count
            seen = self._counts[kind]
        if self.strict:
            error = DataError(f"{what} (data.strict is set; set it to false to skip and count such data)")
            with self._lock:
                self.first_error = self.first_error or error
            raise error
        if seen - count < _WARNINGS_PER_KIND:
            more = f" (further ones are only counted, as {kind} in the metrics)" if seen >= _WARNINGS_PER_KIND else ""
            log.warning("%s; %s%s", what, done, more)

    def add_bytes_read(self, count: int) -> None:
        with self._lock:
            self.bytes_read += count

    def reset(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self._counts, 0)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _Counted:
    """A binary file whose reads are counted in ``stats.bytes_read``."""

    def __init__(self, f, stats: DataStats):
        self._f, self._stats = f, stats

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._stats.add_bytes_read(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


class _LineRange:
    """The bytes of the lines of ``f`` that begin at offsets in ``[start, end)``: the line
    in progress at ``start`` is skipped (the range before holds it), and the line in
    progress at ``end`` is read to its end. Looking for a line's end, reads start small
    and grow, so little is read that the next range reads again."""

    def __init__(self, f, start: int, end: int):
        self._f, self._end, self._done, self._buffer = f, end, False, b""
        self._pos = start  # offset of the next byte to deliver (the buffer's first)
        if start > 0:
            self._pos = start - 1
            f.seek(self._pos)
            for size in _growing_reads():  # to the first line that begins at or after start
                chunk = f.read(size)
                newline = chunk.find(b"\n")
                if newline >= 0 or not chunk:
                    self._done = not chunk
                    self._pos += newline + 1
                    self._buffer = chunk[newline + 1:]
                    break
                self._pos += len(chunk)
        self._done = self._done or self._pos >= end
        self._tail = _growing_reads()

    def _take(self, n: int) -> bytes:
        if self._buffer:
            data, self._buffer = self._buffer[:n], self._buffer[n:]
            return data
        return self._f.read(n)

    def read(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._pos < self._end:
            data = self._take(min(n, self._end - self._pos))
            self._pos += len(data)
            # A line that begins exactly at end belongs to the next range.
            self._done = not data or (self._pos == self._end and data.endswith(b"\n"))
            return data
        data = self._take(min(n, next(self._tail)))  # the rest of the line in progress at end
        newline = data.find(b"\n")
        if newline >= 0 or not data:
            self._done = True
            data = data[: newline + 1] if newline >= 0 else data
        self._pos += len(data)
        return data


def _growing_reads(first: int = 256, largest: int = 1 << 16) -> Iterator[int]:
    size = first
    while True:
        yield size
        size = min(2 * size, largest)




def splittable(path: str, kind: str) -> bool:
    """Whether a file can be read in byte ranges: uncompressed, a record per line."""
    return kind in ("text", "jsonl", "tsv") and not path.endswith(".gz")


def _lines(f, max_bytes: int, path: str, stats: DataStats) -> Iterator[tuple[bytes, int]]:
    """(line without its terminator, terminator length) for every non-blank line."""
    pending: list[bytes] = []
    pending_bytes = 0
    skipping = False  # inside a line already found too long

    def emit(line: bytes, terminator: int):
        if line.endswith(b"\r"):
            line, terminator = line[:-1], terminator + 1
        if len(line) > max_bytes:
            stats.problem("oversized_documents", f"{path}: a line of {len(line):,} bytes exceeds data.max_document_bytes", "skipped")
        elif line.strip():
            return line, terminator
        return None

    while chunk := f.read(CHUNK_BYTES):
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            if skipping:
                skipping = False
                continue
            if pending:
                part = b"".join(pending) + part
                pending, pending_bytes = [], 0
            if (record := emit(part, 1)) is not None:
                yield record
        tail = parts[-1]
        if tail and not skipping:
            pending.append(tail)
            pending_bytes += len(tail)
            if pending_bytes > max_bytes + 1:  # + 1: room for a '\r' that a '\n' would follow
                stats.problem(
                    "oversized_documents", f"{path}: a line of over {max_bytes:,} bytes exceeds data.max_document_bytes", "skipped"
                )
                pending, pending_bytes, skipping = [], 0, True
    if pending and (record := emit(b"".join(pending), 0)) is not None:
        yield record


_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _tfrecords(f, max_bytes: int, path: str, stats: DataStats) -> Iterator[tuple[bytes, int]]:
    """Payloads of a TFRecord file: uint64 length, its masked CRC32C, data, the data's CRC.

    A record whose data fails its checksum is skipped; a length that fails its checksum
    (or a truncated file) ends the file, since nothing after it can be found."""
    index = 0
    while header := f.read(12):
        if len(header) < 12 or _masked_crc(header[:8]) != struct.unpack("<I", header[8:])[0]:
            stats.problem("corrupt_records", f"{path}: record {index} has a damaged length", "the rest of the file is skipped")
            return
        (length,) = struct.unpack("<Q", header[:8])
        if length > max_bytes:
            stats.problem("oversized_documents", f"{path}: record {index} of {length:,} bytes exceeds data.max_document_bytes", "skipped")
            skipped = 0
            while skipped < length + 4 and (piece := f.read(min(CHUNK_BYTES, length + 4 - skipped))):
                skipped += len(piece)
        else:
            data, footer = f.read(length), f.read(4)
            if len(data) < length or len(footer) < 4:
                stats.problem("corrupt_records", f"{path}: record {index} is truncated", "the rest of the file is lost")
                return
            if _masked_crc(data) != struct.unpack("<I", footer)[0]:
                stats.problem("corrupt_records", f"{path}: record {index} fails its checksum", "skipped")
            else:
                yield data, 0
        index += 1


def _whole_file(f, max_bytes: int, path: str, stats: DataStats) -> Iterator[tuple[bytes, int]]:
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        stats.problem("oversized_documents", f"{path}: over {max_bytes:,} bytes exceed data.max_document_bytes", "skipped")
        return
    if data.strip():
        yield data, 0


READERS = {"text": _lines, "jsonl": _lines, "tsv": _lines, "tfrecord": _tfrecords, "file": _whole_file}


def read_file(path: str, kind: str, max_bytes: int, stats: DataStats, start: int = 0,
              end: int = -1) -> Iterator[tuple[bytes, int]]:
    """(record, separator bytes) of one file; a file that fails to open or read is
    counted and ends early.

    Args:
      path: local or remote file (``.gz`` decompressed).
      kind: ``text``, ``jsonl`` or ``tsv`` (a record per line), ``tfrecord``, or ``file``
        (the whole file).
      max_bytes: records longer than this are skipped and counted.
      stats: where problems and the bytes read are counted.
      start, end: only the lines that begin at byte offsets in ``[start, end)``
        (``end`` -1: to the end of the file); for ``splittable`` files only.
    """
    if (start or end >= 0) and not splittable(path, kind):
        raise ValueError(f"{path}: a {kind} file cannot be read in byte ranges")
    try:
        raw = _Counted(tf.io.gfile.GFile(path, "rb"), stats)
        try:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
            if start or end >= 0:
                f = _LineRange(f, start, end if end >= 0 else 1 << 62)
            yield from READERS[kind](f, max_bytes, path, stats)
        finally:
            raw.close()
    except (OSError, EOFError, tf.errors.OpError) as e:
        reason = getattr(e, "message", None) or str(e)
        reason = reason.splitlines()[0] if reason else type(e).__name__
        stats.problem("unreadable_files", f"{path} could not be read ({reason})", "the rest of it is skipped")


@tf.autograph.experimental.do_not_convert
def records_dataset(files: tf.Tensor, kind: str, max_bytes: int, stats: DataStats,
                    ranges: tf.Tensor | None = None) -> tf.data.Dataset:
    """A tf.data stream of ``(record, separator_bytes)`` from ``files`` (a 1-D string
    tensor), read in order; Python reads, tf.data receives records in chunks.
    ``ranges``: int64 ``[len(files), 2]``, the byte range ``[start, end)`` of each file
    to read (``read_file``); default: whole files."""
    if ranges is None:
        ranges = tf.tile(tf.constant([[0, -1]], tf.int64), [tf.size(files), 1])

    def generate(paths, spans):
        records, separators, size = [], [], 0
        for path, (start, end) in zip(paths, spans):
            for record, separator in read_file(path.decode(), kind, max_bytes, stats, int(start), int(end)):
                records.append(record)
                separators.append(separator)
                size += len(record)
                if len(records) >= 1024 or size >= CHUNK_BYTES:
                    yield records, separators
                    records, separators, size = [], [], 0
        if records:
            yield records, separators

    chunks = tf.data.Dataset.from_generator(
        generate,
        args=(files, ranges),
        output_signature=(tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)),
    )
    return chunks.unbatch()
