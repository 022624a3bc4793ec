"""The input pipeline: sources, determinism, process-count independence, exact resume, bad input."""

import dataclasses
import gzip
import json

import numpy as np
import pytest
import tensorflow as tf

from t2x.config import DataConfig
from t2x.data import DataError, Source, load_tokenizer
from t2x.data.pipeline import (
    RowLayout,
    ShardPosition,
    TrainBatches,
    check_data,
    eval_dataset,
    positions_to_state,
    state_to_positions,
)
from t2x.data.reader import DataStats
from t2x.data.sources import read_texts

TOKENIZER = "builtin:512"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def docs(n, seed=0, max_words=40):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "return", "value", "the", "of", "list"]
    return [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(3, max_words))) for i in range(n)]


def config(**kw):
    base = dict(tokenizer=TOKENIZER, seq_len=16, num_shards=4, block_docs=8, doc_shuffle_buffer=16)
    return DataConfig(**{**base, **kw})


def take(batches, n):
    return [next(batches) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_builtin_corpus_builds_with_a_fixed_held_out_split(tokenizer):
    train, held_out = Source(config(), "train"), Source(config(), "eval")
    train_texts = set(read_texts(train.files))
    held_out_texts = list(read_texts(held_out.files))
    assert len(train_texts) > 5000 and len(held_out_texts) > 100
    assert train_texts.isdisjoint(held_out_texts)


def test_batches_are_deterministic_and_seed_dependent(tokenizer):
    cfg = config()
    source = Source(cfg, "train")
    a = take(TrainBatches(source, tokenizer, cfg, 8, seed=0, rows=range(8)), 4)
    b = take(TrainBatches(source, tokenizer, cfg, 8, seed=0, rows=range(8)), 4)
    c = take(TrainBatches(source, tokenizer, cfg, 8, seed=1, rows=range(8)), 4)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])
    assert a[0]["tokens"].shape == (8, 16) and a[0]["num_bytes"].shape == (8,)


def test_pipelines_run_no_autotuning_thread(tokenizer):
    # tf.data's autotuning thread can miss a closing iterator's cancellation and hold the
    # end of a run for the rest of its optimization period (up to a minute).
    cfg = config()
    batches = TrainBatches(Source(cfg, "train"), tokenizer, cfg, 8, seed=0, rows=range(8))
    evaluation = eval_dataset(Source(cfg, "eval"), tokenizer, cfg, 8, range(8), DataStats())
    assert next(batches)["tokens"].shape == (8, 16)
    for dataset in (batches.dataset, evaluation):
        assert dataset.options().autotune.enabled is False
    batches.close()


@pytest.mark.parametrize("processes", [2, 4])
def test_global_batch_does_not_depend_on_the_process_count(tokenizer, processes):
    cfg = config()
    source = Source(cfg, "train")
    whole = take(TrainBatches(source, tokenizer, cfg, 8, seed=3, rows=range(8)), 5)
    per_process = 8 // processes
    parts = [
        take(TrainBatches(source, tokenizer, cfg, 8, seed=3, rows=range(p * per_process, (p + 1) * per_process)), 5)
        for p in range(processes)
    ]
    joined = [{k: np.concatenate([part[i][k] for part in parts]) for k in whole[i]} for i in range(5)]
    assert_batches_equal(whole, joined)


def test_resume_reads_exactly_what_the_uninterrupted_run_reads(tmp_path, tokenizer):
    # A small corpus so that the run crosses blocks and epochs.
    path = write_jsonl(tmp_path / "train.jsonl", docs(40, max_words=10))
    cfg = config(source="files", train_files=(path,), num_shards=2, block_docs=4, doc_shuffle_buffer=8)
    source = Source(cfg, "train")
    straight = TrainBatches(source, tokenizer, cfg, 4, seed=5, rows=range(4))
    expected = take(straight, 40)
    assert {p.epoch for p in straight.positions.values()} != {0}, "the run should reach a second epoch"
    for stop in (1, 7, 23):
        first = TrainBatches(source, tokenizer, cfg, 4, seed=5, rows=range(4))
        take(first, stop)
        state = positions_to_state(first.positions, cfg.num_shards)
        resumed = TrainBatches(source, tokenizer, cfg, 4, seed=5, rows=range(4), positions=state_to_positions(state))
        assert_batches_equal(take(resumed, 40 - stop), expected[stop:])


def test_eval_covers_every_document_once(tmp_path, tokenizer):
    texts = docs(37, seed=1)
    path = write_jsonl(tmp_path / "eval.jsonl", texts)
    for num_shards, batch in ((1, 2), (4, 8)):
        cfg = config(source="files", train_files=(path,), eval_files=(path,), num_shards=num_shards)
        stats = DataStats()
        dataset = eval_dataset(Source(cfg, "eval"), tokenizer, cfg, batch, range(batch), stats)
        tokens, total_bytes, steps = [], 0, 0
        for b in dataset.as_numpy_iterator():
            if not b["segment_ids"].any():
                break
            tokens.extend(b["tokens"][b["segment_ids"] > 0].tolist())
            total_bytes += int(b["num_bytes"].sum())
            steps += 1
        expected_tokens = sum(len(t) + 1 for t in tokenizer.encode(texts))
        assert len(tokens) == expected_tokens
        assert tokens.count(tokenizer.eos_id) == len(texts)
        assert total_bytes == sum(len(t.encode()) for t in texts)
        assert stats.as_dict()["documents"] == len(texts)


def test_text_tfrecord_and_gzip_sources_read_the_same_documents(tmp_path, tokenizer):
    texts = docs(12, seed=2)
    (tmp_path / "a.txt").write_text("\n".join(texts[:6]) + "\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\n".join(texts[6:]) + "\n")
    with tf.io.TFRecordWriter(str(tmp_path / "c.tfrecord")) as w:
        for t in texts:
            feature = {"text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    assert list(read_texts([str(tmp_path / "a.txt")])) == texts[:6]
    assert list(read_texts([str(tmp_path / "b.txt.gz")])) == texts[6:]
    assert list(read_texts([str(tmp_path / "c.tfrecord")])) == texts
    whole = DataConfig(source="files", train_files=(str(tmp_path / "a.txt"),), text_unit="file")
    [(record, separator)] = list(Source(whole, "train").shard_fn(0, 1, 0, False, DataStats())(0).as_numpy_iterator())
    assert record.decode() == "\n".join(texts[:6]) + "\n" and separator == 0


def test_tfds_source_reads_the_text_feature(tokenizer):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        cfg = config(source="tfds", tfds_name="lm1b", train_split="train", num_shards=2)
        batch = next(TrainBatches(Source(cfg, "train"), tokenizer, cfg, 4, seed=0, rows=range(4)))
    assert batch["tokens"].shape == (4, 16)
    assert (batch["segment_ids"] > 0).sum() > 0


def test_invalid_utf8_is_replaced_or_skipped_and_counted(tmp_path, tokenizer):
    good = [t.encode() for t in docs(5)]
    bad = b"caf\xe9 au lait \xff\xfe"
    (tmp_path / "mixed.txt").write_bytes(b"\n".join(good[:2] + [bad] + good[2:]) + b"\n")
    for policy, kept in (("replace", 6), ("skip", 5)):
        cfg = config(source="files", train_files=(str(tmp_path / "mixed.txt"),), eval_files=(str(tmp_path / "mixed.txt"),),
                     num_shards=1, invalid_utf8=policy)
        stats = DataStats()
        dataset = eval_dataset(Source(cfg, "eval"), tokenizer, cfg, 2, range(2), stats)
        eos = 0
        for b in dataset.as_numpy_iterator():
            if not b["segment_ids"].any():
                break
            eos += int((b["tokens"][b["segment_ids"] > 0] == tokenizer.eos_id).sum())
        assert eos == kept
        assert stats.as_dict()["invalid_utf8"] == 1


def test_malformed_jsonl_lines_are_skipped_and_counted(tmp_path, tokenizer):
    lines = [b'{"text": "fine"}', b"not json", b'{"other": 1}', b'{"text": 5}', b"[1]", b'{"text": "also fine"}']
    stats = DataStats()
    from t2x.data.sources import decode_records

    texts, separators = decode_records(lines, [1] * len(lines), "jsonl", "text", "replace", stats)
    assert texts == ["fine", "also fine"] and separators == [0, 0]  # a JSONL line's newline is not text
    assert stats.as_dict()["bad_records"] == 4


def test_missing_files_and_empty_corpora_are_reported(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data\.train_files: no file matches"):
        Source(config(source="files", train_files=(str(tmp_path / "nothing-*.txt"),)), "train")
    with pytest.raises(DataError, match=r"data\.eval_files is empty"):
        Source(config(source="files", train_files=(str(tmp_path),)), "eval")
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = config(source="files", train_files=(str(tmp_path / "empty.txt"),), eval_files=(str(tmp_path / "empty.txt"),))
    with pytest.raises(DataError, match="corpus is empty"):
        check_data(Source(empty, "train"), empty, every_shard=True)
    with pytest.raises(DataError, match="corpus is empty"):
        check_data(Source(empty, "eval"), empty, every_shard=False)
    few = write_jsonl(tmp_path / "few.jsonl", docs(2))
    few_cfg = config(source="files", train_files=(few,), eval_files=(few,))
    with pytest.raises(DataError, match="lower it"):
        check_data(Source(few_cfg, "train"), few_cfg, every_shard=True)
    check_data(Source(few_cfg, "eval"), few_cfg, every_shard=False)  # evaluation can have empty shards


def test_data_without_usable_text_is_reported_instead_of_read_forever(tmp_path):
    wrong_field = tmp_path / "wrong.jsonl"
    wrong_field.write_text("".join(json.dumps({"content": t}) + "\n" for t in docs(20)))
    cfg = config(source="files", train_files=(str(wrong_field),), eval_files=(str(wrong_field),))
    for split, every_shard in (("train", True), ("eval", False)):
        with pytest.raises(DataError, match=r"data\.text_key"):
            check_data(Source(cfg, split), cfg, every_shard=every_shard)
    undecodable = tmp_path / "latin1.txt"
    undecodable.write_bytes(b"caf\xe9\n" * 50)
    strict = config(source="files", train_files=(str(undecodable),), invalid_utf8="skip", num_shards=1)
    with pytest.raises(DataError, match="no usable text"):
        check_data(Source(strict, "train"), strict, every_shard=True)


def test_files_are_balanced_across_shards_by_size():
    from t2x.data.sources import assign_files

    sizes = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    shards = assign_files(sizes, 2)
    totals = [sum(sizes[i] for i in files) for files in shards]
    assert sorted(totals) == [100, 100] and sorted(i for s in shards for i in s) == list(range(11))
    assert assign_files([5, 5, 5], 3) == [[0], [1], [2]]


def test_interleaved_processes_read_their_rows_and_join_into_the_whole_batch(tokenizer):
    """A pod's topology can give a process every other pair of rows: it reads the shards
    those rows come from and keeps exactly its rows, in order."""
    cfg = config()  # 4 shards of 2 rows in a batch of 8
    source = Source(cfg, "train")
    whole = take(TrainBatches(source, tokenizer, cfg, 8, seed=3, rows=range(8)), 3)
    mine, theirs = [0, 1, 4, 5], [2, 3, 6, 7]
    layout = RowLayout(8, 4, [5, 0, 4, 1])
    assert layout.shards == [0, 2] and layout.take == [0, 1, 2, 3]
    assert RowLayout(8, 4, [1, 5]).take == [1, 3]  # half of two shards: rows 1 and 5
    for rows in (mine, theirs, [1, 5]):
        part = take(TrainBatches(source, tokenizer, cfg, 8, seed=3, rows=rows), 3)
        for got, want in zip(part, whole):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key][rows])


def test_positions_round_trip():
    positions = {0: ShardPosition(1, 2, 3), 2: ShardPosition(0, 5, 0)}
    state = positions_to_state(positions, 4)
    assert state.shape == (4, 3) and (state[1] == -1).all()
    assert state_to_positions(state.tolist()) == positions


def test_an_eval_split_that_fills_few_shards_is_warned_about(tmp_path, caplog):
    """Two files read whole fill 2 of 8 shards: evaluation batches would be mostly padding."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("\n".join(docs(30, seed=len(name))) + "\n")
    cfg = config(source="files", train_files=(str(tmp_path / "*.txt"),), eval_files=(str(tmp_path / "*.txt"),),
                 text_unit="file", num_shards=8)
    check_data(Source(cfg, "eval"), cfg, every_shard=False)
    assert any("only 2 of 8 logical data shards hold documents" in m and "data.num_shards" in m
               for m in caplog.messages)
    caplog.clear()
    check_data(Source(cfg, "eval"), dataclasses.replace(cfg, num_shards=2), every_shard=False)
    assert not caplog.messages


def test_a_position_made_before_byte_ranges_is_not_resumed_from_them(tmp_path):
    from t2x.config import ConfigError
    from t2x.train.resume import DATA_LAYOUT, check_data_state, data_meta
    from conftest import tiny_config

    cfg = tiny_config(tmp_path)  # the built-in corpus: one file, fewer than the shards
    meta = data_meta(cfg, Source(cfg.data, "train"), load_tokenizer(cfg.data.tokenizer))
    assert meta[DATA_LAYOUT] == "byte ranges"
    check_data_state(meta, meta)
    with pytest.raises(ConfigError, match="byte ranges.*start a new train.run_dir"):
        check_data_state({k: v for k, v in meta.items() if k != DATA_LAYOUT}, meta)
