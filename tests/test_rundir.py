"""Run directories on non-local filesystems (tf.io.gfile's in-memory ram:// stands in for gs://)."""

import json

import pytest

from conftest import tiny_config
from t2x.config import ConfigError
from t2x.data import load_tokenizer, train_tokenizer
from t2x.rundir import check_writable, load_run, tokenizer_spec, write_run_files
from t2x.train.metrics import MetricsWriter


def test_run_files_config_and_metrics_on_a_remote_filesystem():
    run_dir = "ram://runs/remote-test"
    cfg = tiny_config(run_dir, "train.steps=9")
    assert check_writable(cfg) == run_dir
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    write_run_files(run_dir, cfg, tokenizer.files)
    loaded, where = load_run(run_dir, ["eval.max_batches=3"])
    assert where == run_dir and loaded.train.steps == 9 and loaded.eval.max_batches == 3
    assert load_tokenizer(tokenizer_spec(loaded, run_dir)).files == tokenizer.files
    for step in (1, 2):  # two launches append to the same file
        writer = MetricsWriter(run_dir)
        writer.write("train", step, {"loss": float(step)})
        writer.close()
    import tensorflow as tf

    with tf.io.gfile.GFile(f"{run_dir}/metrics.jsonl") as f:
        assert [json.loads(line)["loss"] for line in f] == [1.0, 2.0]
    assert tf.io.gfile.glob(f"{run_dir}/tensorboard/train/events.out.tfevents.*")


def test_tokenizer_written_to_and_read_from_a_remote_filesystem():
    text = [f"word{i % 50} and more words {i}" for i in range(400)]
    path = train_tokenizer(text, 282, "ram://tokenizers/sp")
    assert path == "ram://tokenizers/sp.model" and load_tokenizer(path).vocab_size == 282


def test_unwritable_run_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="train.run_dir"):
        check_writable(tiny_config(tmp_path / "file" / "run"))
