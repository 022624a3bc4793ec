"""The t2x command: the real entry point end to end, --help, and bad input."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from t2x import cli

TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


def run_t2x(*args):
    return subprocess.run([sys.executable, "-m", "t2x.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_train_then_eval_through_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_t2x("train", TINY_CONFIG, *TINY, f"train.run_dir={run_dir}", "eval.max_batches=null")
    assert trained.returncode == 0, trained.stderr
    final = json.loads(trained.stdout.strip().splitlines()[-1])
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "step"} <= final.keys()
    assert final["step"] == 4 and final["perplexity"] > 1
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl", "checkpoints/4", "tensorboard/train"):
        assert (run_dir / name).exists(), name

    evaluated = run_t2x("eval", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 4
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert result["tokens"] == final["tokens"]


@pytest.mark.parametrize("command", [["--help"], ["train", "--help"], ["eval", "--help"], ["tokenizer", "train", "--help"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command)
    assert exit_info.value.code == 0
    assert "usage: t2x" in capsys.readouterr().out


def test_tokenizer_train_command(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i} with words alpha beta gamma {i * 7}" for i in range(300)))
    assert cli.main(["tokenizer", "train", "--input", str(text), "--vocab-size", "288", "--output", str(tmp_path / "sp")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vocab_size"] == 288 and (tmp_path / "sp.model").exists()


def _bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a_file").write_text("x")
    return {
        "unknown key": (["model.hidden_size=3"], "model.hidden_size"),
        "missing data": (["data.source=files", f"data.train_files=[{tmp_path}/nope-*.txt]"], "data.train_files"),
        "empty corpus": (["data.source=files", f"data.train_files=[{tmp_path}/empty.txt]",
                          f"data.eval_files=[{tmp_path}/empty.txt]"], "empty"),
        "mesh": (["mesh.data=3"], "mesh.data"),
        "batch vs shards": (["train.global_batch_size=12"], "data.num_shards"),
        "batch vs devices": (["train.global_batch_size=4", "data.num_shards=4"], "data-parallel devices"),
        "vocabulary": (["model.vocab_size=300"], "model.vocab_size"),
        "tokenizer": ([f"data.tokenizer={tmp_path}/missing.model"], "data.tokenizer"),
        "run dir": ([f"train.run_dir={tmp_path}/a_file/run"], "train.run_dir"),
    }


BAD_INPUTS = ["unknown key", "missing data", "empty corpus", "mesh", "batch vs shards", "batch vs devices",
              "vocabulary", "tokenizer", "run dir"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_nonzero_naming_what_to_change(case, tmp_path, capsys):
    overrides, named = _bad_inputs(tmp_path)[case]
    run_dir = tmp_path / "run"
    code = cli.main(["train", TINY_CONFIG, *TINY, f"train.run_dir={run_dir}", *overrides])
    err = capsys.readouterr().err
    assert code == 1
    assert "error:" in err and named in err
    assert not (run_dir / "checkpoints").exists(), "nothing is written before the input is checked"
