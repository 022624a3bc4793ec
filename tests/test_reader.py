"""Reading files: exact bytes per line, and bad data counted and skipped (or stopping a strict run)."""

import numpy as np
import pytest
import tensorflow as tf

from t2x.config import DataConfig
from t2x.data import Source, load_tokenizer
from t2x.data.pipeline import data_errors, eval_dataset
from t2x.data.reader import DataError, DataStats, read_file


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:512")


def read(path, kind="text", max_bytes=1 << 20, strict=False):
    stats = DataStats(strict=strict)
    return list(read_file(str(path), kind, max_bytes, stats)), stats.as_dict()


def evaluated(cfg, tokenizer, batch=2):
    """Tokens and bytes of a whole eval pass, and the problems counted."""
    stats = DataStats(strict=cfg.strict)
    tokens = num_bytes = 0
    with data_errors(stats):
        for b in eval_dataset(Source(cfg, "eval"), tokenizer, cfg, batch, range(batch), stats).as_numpy_iterator():
            if not b["segment_ids"].any():
                break
            tokens += int((b["segment_ids"] > 0).sum())
            num_bytes += int(b["num_bytes"].sum())
    return tokens, num_bytes, stats.as_dict()


def files_config(path, **kw):
    return DataConfig(source="files", train_files=(str(path),), eval_files=(str(path),), tokenizer="builtin:512",
                      seq_len=16, num_shards=kw.pop("num_shards", 2), **kw)


def test_lines_keep_their_separator_length(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"unix\nwindows\r\n\n   \n\xc3\xa9t\xc3\xa9\nlast without newline")
    records, problems = read(path)
    assert records == [(b"unix", 1), (b"windows", 2), (b"\xc3\xa9t\xc3\xa9", 1), (b"last without newline", 0)]
    assert not any(v for k, v in problems.items() if k != "documents")


def test_bits_per_byte_count_every_byte_of_a_plain_file(tmp_path, tokenizer):
    """Each line's text and its newline: the bytes of the file, exactly."""
    rng = np.random.default_rng(0)
    words = ["parse", "ünïcode", "日本語", "tab\there", "x", "  spaced  ", "emoji 😀", "\x00nul"]
    lines = [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(60)]
    text = "\r\n".join(lines[:10]) + "\r\n" + "\n".join(lines[10:]) + "\n"
    path = tmp_path / "plain.txt"
    path.write_bytes(text.encode())
    tokens, num_bytes, _ = evaluated(files_config(path), tokenizer)
    assert num_bytes == len(text.encode())
    assert tokens == sum(len(t) + 1 for t in tokenizer.encode(lines))
    # Blank and whitespace-only lines are not documents, and their bytes are not scored.
    path.write_bytes(text.encode() + b"\n   \n\t\n")
    assert evaluated(files_config(path), tokenizer)[:2] == (tokens, num_bytes)


def test_a_capped_evaluation_counts_the_bytes_of_the_tokens_it_scored(tmp_path, tokenizer):
    long_lines = [" ".join(f"word{i}{j}" for j in range(300)) for i in range(4)]
    path = tmp_path / "long.txt"
    path.write_text("\n".join(long_lines) + "\n")
    cfg = files_config(path, num_shards=1)
    stats = DataStats()
    first = next(eval_dataset(Source(cfg, "eval"), tokenizer, cfg, 1, range(1), stats).as_numpy_iterator())
    tokens = first["tokens"][0][first["segment_ids"][0] > 0]
    # The first row holds the start of the first line: exactly the bytes its pieces spell.
    assert first["num_bytes"][0] == len(tokenizer.decode(tokens.tolist()).encode())
    assert 0 < first["num_bytes"][0] < len(long_lines[0])


def tfrecord(path, payloads):
    """A TFRecord file, written by TensorFlow."""
    with tf.io.TFRecordWriter(str(path)) as w:
        for p in payloads:
            w.write(p)


def test_tfrecord_framing_and_damaged_records(tmp_path):
    payloads = [f"record {i}".encode() * (i + 1) for i in range(5)]
    path = tmp_path / "r.tfrecord"
    tfrecord(path, payloads)
    assert [r for r, _ in read(path, "tfrecord")[0]] == payloads
    data = bytearray(path.read_bytes())
    offset = sum(16 + len(p) for p in payloads[:2])  # record 2 starts here
    data[offset + 12 + 3] ^= 0x01  # a flipped bit in record 2's data
    path.write_bytes(bytes(data))
    records, problems = read(path, "tfrecord")
    assert [r for r, _ in records] == payloads[:2] + payloads[3:] and problems["corrupt_records"] == 1
    data[offset + 12 + 3] ^= 0x01
    data[offset + 2] ^= 0x40  # a damaged length: nothing after it can be found
    path.write_bytes(bytes(data))
    records, problems = read(path, "tfrecord")
    assert [r for r, _ in records] == payloads[:2] and problems["corrupt_records"] == 1
    data[offset + 2] ^= 0x40
    path.write_bytes(bytes(data[: offset + 12 + 4]))  # truncated inside record 2
    records, problems = read(path, "tfrecord")
    assert [r for r, _ in records] == payloads[:2] and problems["corrupt_records"] == 1


def test_bad_data_is_counted_and_skipped(tmp_path, tokenizer):
    good = [f"good document {i} about parsing values" for i in range(30)]
    (tmp_path / "a.txt").write_bytes(
        "\n".join(good[:10]).encode() + b"\nbad \xff\xfe bytes\nnul \x00 bytes\n" + b"y" * 5000 + b"\n"
    )
    (tmp_path / "b.txt").write_bytes(b"")
    (tmp_path / "c.txt").write_text("\n".join(good[10:20]) + "\n")
    (tmp_path / "d.txt").write_text("\n".join(good[20:]) + "\n")
    cfg = DataConfig(source="files", train_files=(str(tmp_path / "*.txt"),), eval_files=(str(tmp_path / "*.txt"),),
                     tokenizer="builtin:512", seq_len=16, num_shards=1, max_document_bytes=1000)
    source = Source(cfg, "eval")
    (tmp_path / "c.txt").unlink()  # deleted after the run listed it
    stats = DataStats()
    records = []
    for batch, separators in source.shard_fn(0, 1, 0, False, stats)(0).batch(100).as_numpy_iterator():
        records.extend(batch.tolist())
    texts = [r.decode("utf-8", "replace") for r in records]
    assert texts == good[:10] + ["bad \ufffd\ufffd bytes", "nul \x00 bytes"] + good[20:]
    problems = stats.as_dict()
    assert problems["oversized_documents"] == 1 and problems["unreadable_files"] == 1
    # Through the whole pipeline: repaired UTF-8 is counted too, and evaluation goes on.
    tokens, _, problems = evaluated(cfg, tokenizer)
    assert tokens > 0 and problems["invalid_utf8"] == 1 and problems["oversized_documents"] == 1
    assert problems["documents"] == 22


def test_strict_mode_stops_at_the_first_problem_naming_the_file(tmp_path, tokenizer):
    path = tmp_path / "a.txt"
    path.write_text("fine line\n" + "x" * 3000 + "\nfine again\n")
    cfg = files_config(path, num_shards=1, max_document_bytes=1000, strict=True)
    with pytest.raises(DataError, match=r"a\.txt.*data\.max_document_bytes.*data\.strict") as caught:
        evaluated(cfg, tokenizer)
    assert "skipped" not in str(caught.value).split("(data.strict")[0]  # nothing was skipped: the run stops


def test_a_shard_whose_files_all_vanish_stops_training_instead_of_spinning(tmp_path, tokenizer):
    from t2x.data.pipeline import TrainBatches

    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("\n".join(f"{name} document {i} about parsing" for i in range(40)) + "\n")
    cfg = DataConfig(source="files", train_files=(str(tmp_path / "*.txt"),), tokenizer="builtin:512", seq_len=16,
                     num_shards=2, block_docs=8)
    batches = TrainBatches(Source(cfg, "train"), tokenizer, cfg, 2, seed=0, rows=range(2))
    next(batches)
    (tmp_path / "b.txt").unlink()  # the second shard's only file
    with pytest.raises(DataError, match="logical data shard 1 .* without a usable document"):
        for _ in range(200):
            next(batches)
    batches.close()


def test_byte_ranges_that_tile_a_file_read_each_line_once(tmp_path):
    """Lines of every length (blank, CRLF, longer than a range, none after the last
    newline), cut at random offsets: the ranges' lines, in order, are the file's."""
    rng = np.random.default_rng(1)
    lines = [b"x" * int(n) for n in rng.choice([0, 1, 5, 40, 3000, 70000], 300)]
    data = b"".join(line + (b"\r\n" if i % 7 == 0 else b"\n") for i, line in enumerate(lines)) + b"tail"
    path = tmp_path / "cut.txt"
    path.write_bytes(data)
    whole, _ = read(path)
    for cuts in ([], [1], [len(data) - 1], sorted(rng.choice(len(data), 40, replace=False).tolist()),
                 [data.index(b"\n") + 1, data.index(b"\n") + 2]):  # a cut right after a newline
        bounds = [0, *cuts, len(data)]
        stats = DataStats()
        pieces = [list(read_file(str(path), "text", 1 << 20, stats, lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
        assert [r for piece in pieces for r in piece] == whole
        assert stats.bytes_read <= len(data) + len(cuts) * 2 * 70_002  # at most two long lines per cut


def test_a_file_fewer_than_the_shards_is_read_once_per_epoch(tmp_path):
    """One file, 8 shards: together the shards read its bytes once (not 8 times) and
    every line is in exactly one shard; a gzip file cannot be cut and is read by all."""
    import gzip

    lines = [f"line {i} " + "word " * (i % 50) for i in range(4000)]
    text = "\n".join(lines) + "\n"
    for name, write in (("plain.txt", lambda p: p.write_text(text)),
                        ("packed.txt.gz", lambda p: p.write_bytes(gzip.compress(text.encode())))):
        path = tmp_path / name
        write(path)
        cfg = files_config(path, num_shards=8)
        source = Source(cfg, "train")
        stats = DataStats()
        shards = [[r.decode() for r, _ in source.shard_fn(k, 8, 0, shuffle_files=False, stats=stats)(0).as_numpy_iterator()]
                  for k in range(8)]
        assert sorted(line for shard in shards for line in shard) == sorted(lines)
        size = path.stat().st_size
        if name == "plain.txt":
            assert source.splits_files(8)
            assert size <= stats.bytes_read < 1.05 * size
            assert min(len(s) for s in shards) > 0.8 * len(lines) / 8  # balanced by bytes
        else:
            assert not source.splits_files(8)
            assert stats.bytes_read == 8 * size
