"""The t2x command: the real entry point end to end, --help, and bad input."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from t2x import cli
from t2x.infer.engine import generate
from t2x.infer.model import load
from t2x.infer.sampling import Sampling

TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


def run_t2x(*args):
    return subprocess.run([sys.executable, "-m", "t2x.cli", *args], capture_output=True, text=True, cwd=REPO)


def strict_json(line: str) -> dict:
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_train_then_eval_through_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_t2x("train", TINY_CONFIG, *TINY, f"train.run_dir={run_dir}", "eval.max_batches=null",
                      "train.sample_tokens=6")  # the prompt is tiny.yaml's
    assert trained.returncode == 0, trained.stderr
    [line] = trained.stdout.splitlines()  # the result and nothing else
    final = strict_json(line)
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "step"} <= final.keys()
    assert final["step"] == 4 and final["perplexity"] > 1
    # It ends with a sample, the one `t2x generate` gives with the same settings.
    sampling = Sampling(max_new_tokens=6, temperature=0.8, seed=0)
    assert final["sample"] == generate(load(str(run_dir)), ["Return the"], sampling)[0].text
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl", "checkpoints/4", "tensorboard/train"):
        assert (run_dir / name).exists(), name

    evaluated = run_t2x("eval", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr
    [line] = evaluated.stdout.splitlines()
    result = strict_json(line)
    assert result["step"] == 4
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert result["tokens"] == final["tokens"]
    helped = run_t2x("eval", "--help").stdout
    assert all(key in helped for key in result), "eval --help names every key it prints"

    # Other text, by glob: every byte of a plain text file is counted.
    text = "first line of other text\nsecond line, ünïcode\n"
    (tmp_path / "other.txt").write_text(text)
    other = run_t2x("eval", str(run_dir), "--text", str(tmp_path / "*.txt"), "eval.global_batch_size=8")
    assert other.returncode == 0, other.stderr
    result = strict_json(other.stdout)
    assert result["bytes"] == len(text.encode()) and result["documents"] == 2

    # A damaged step named with --step fails, naming the step and the item.
    kernel = max((p for p in (run_dir / "checkpoints" / "4" / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(kernel.read_bytes())
    data[len(data) // 2] ^= 0x01
    kernel.write_bytes(bytes(data))
    damaged = run_t2x("eval", str(run_dir), "--step", "4")
    assert damaged.returncode == 1 and damaged.stdout == ""
    assert "checkpoint 4 in" in damaged.stderr and "is damaged: params" in damaged.stderr


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
        "batch vs shards": (["train.global_batch_size=12", "data.num_shards=8"], "data.num_shards"),
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
