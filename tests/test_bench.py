"""``t2x bench``: the real train step of every family on synthetic rows, its figures
consistent with each other, and no TensorFlow on its path."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY, TINY_COMMON
from t2x.bench import synthetic_rows
from t2x.cli import main
from t2x.config import load_config
from t2x.data import load_tokenizer
from t2x.families import task
from t2x.flops import training_flops_per_step

FAMILIES = {
    "decoder": ("tiny.yaml", TINY),
    "encoder": ("bert_tiny.yaml", [o for o in TINY_COMMON if not o.startswith("model.vocab_size")] + ["model.vocab_size=576"]),
    "encoder_decoder": ("t5_tiny.yaml", [o for o in TINY_COMMON if not o.startswith(("model.vocab_size", "model.d_model",
                                                                               "model.num_heads"))]
                        + ["model.vocab_size=576", "model.d_model=32", "model.num_heads=4", "model.head_dim=8"]),
}


def family_config(name, *overrides):
    path, base = FAMILIES[name]
    return load_config(REPO / "configs" / path, [*base, "mesh.data=8", *overrides])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_synthetic_rows_are_the_familys_own_rows(name):
    cfg = family_config(name)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    row_format = task(cfg).rows(cfg, tokenizer)
    rows = synthetic_rows(row_format, tokenizer, 8, cfg.data.seq_len, np.random.default_rng(0))
    assert sorted(rows) == sorted(row_format.features)
    for feature, value in rows.items():
        assert value.shape == (8, *row_format.shape(feature, cfg.data.seq_len)) and value.dtype == np.int32
    assert (rows["segment_ids"] > 0).mean() > (0.5 if name == "encoder_decoder" else 0.9)  # packed, not padding
    assert rows["tokens"].max() < cfg.model.vocab_size
    if name == "decoder":
        assert (rows["segment_ids"] > 0).all()
    if name == "encoder":  # [CLS] opens each document (random tokens never are [CLS])
        cls = rows["tokens"] == tokenizer.bos_id
        assert cls.any() and (rows["positions"][cls] == 0).all()
    if name == "encoder_decoder":  # span corruption: sentinels past the tokenizer's pieces, in inputs and targets
        assert (rows["tokens"] >= tokenizer.vocab_size).any() and (rows["targets"] >= tokenizer.vocab_size).any()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bench_runs_every_family_and_its_figures_agree(name, capsys):
    path, base = FAMILIES[name]
    assert main(["bench", str(REPO / "configs" / path), *base, "mesh.data=8", "--steps", "2", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = family_config(name)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    assert result["family"] == name and result["steps"] == 2 and result["mesh"]["data"] == 8
    assert result["tokens_per_second"] == pytest.approx(tokens / result["step_seconds_median"])
    flops = training_flops_per_step(cfg.model, cfg.train.global_batch_size, cfg.data.seq_len,
                                    target_len=result.get("target_len"),
                                    predictions=cfg.objective.predictions_per_row(cfg.data.seq_len))
    assert result["model_tflops_per_second_per_device"] == pytest.approx(
        flops / result["step_seconds_median"] / 8 / 1e12)
    assert result["mfu"] is None  # no tabulated peak for a CPU
    # Random tokens: a fresh model's loss is about that of a uniform guess.
    assert abs(result["loss"] - math.log(cfg.model.vocab_size)) < 1.0
    assert result["compile_seconds"] > 0 and result["host_peak_rss_bytes"] > 0


def test_bench_refuses_a_classifier_and_bad_counts(capsys):
    assert main(["bench", str(REPO / "configs" / "tiny.yaml"), *TINY, "classify.labels=[a,b]"]) == 1
    assert "classify.labels" in capsys.readouterr().err
    assert main(["bench", str(REPO / "configs" / "tiny.yaml"), *TINY, "--steps", "0"]) == 1
    assert "--steps" in capsys.readouterr().err


def test_bench_runs_without_tensorflow(tmp_path):
    """The model, step and benchmark path imports no TensorFlow (GPU machines may lack it)."""
    load_tokenizer("builtin:512")  # trained (with tf.data) and cached beforehand
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "from t2x.bench import bench; from t2x.config import load_config\n"
            f"r = bench(load_config({str(REPO / 'configs' / 'tiny.yaml')!r}, {TINY!r} + ['mesh.data=8']), steps=1, warmup=0)\n"
            "assert r['tokens_per_second'] > 0\n"
            "print('tensorflow' in sys.modules and sys.modules['tensorflow'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
