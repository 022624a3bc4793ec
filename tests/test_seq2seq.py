"""The T5-style encoder-decoder family trained through ``t2x train``: span corruption on
every mesh, exact resume, another mesh, two processes, and input-target pairs."""

import json

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_COMMON, restored
from t2x.config import load_config
from t2x.train.loop import train
from test_train import MESHES, train_losses, train_on_every_mesh

T5_TINY = REPO / "configs" / "t5_tiny.yaml"
# The tiny test shapes as a T5: 512 pieces, then room for the sentinels.
SEQ2SEQ = [o for o in TINY_COMMON if not o.startswith(("model.vocab_size", "model.d_model", "model.num_heads"))] + [
    "model.vocab_size=576", "model.d_model=32", "model.num_heads=4", "model.head_dim=8",
]


def seq2seq_config(run_dir, *overrides):
    return load_config(T5_TINY, [*SEQ2SEQ, f"train.run_dir={run_dir}", *overrides])


def test_span_corruption_trains_alike_on_every_mesh_resumes_exactly_and_restores_onto_another_mesh(tmp_path):
    common = ["train.steps=3", "checkpoint.every=1", "optim.decay_steps=3"]
    losses, evals = train_on_every_mesh(seq2seq_config, tmp_path, 3, *common[1:])
    for name in losses:
        assert evals[name]["tokens"] == evals["one_device"]["tokens"] > 0
        assert evals[name]["loss"] == pytest.approx(evals["one_device"]["loss"], rel=1e-5)
    mesh = MESHES["mixed222"][0]
    train(seq2seq_config(tmp_path / "resumed", *common, *mesh, "train.steps=1"))
    assert train(seq2seq_config(tmp_path / "resumed", *common, *mesh)) == evals["mixed222"]
    assert [train_losses(tmp_path / "resumed")[s] for s in (1, 2, 3)] == list(losses["mixed222"])
    # Its checkpoint restores onto another mesh, every parameter and moment as saved.
    moved, _ = restored(tmp_path / "resumed", *common, *MESHES["data8"][0], make=seq2seq_config)
    here, _ = restored(tmp_path / "resumed", *common, *mesh, make=seq2seq_config)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(here)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_input_target_pairs_train_and_evaluate_and_bad_pairs_are_refused(tmp_path):
    from t2x.config import ConfigError
    from t2x.data.reader import DataError

    lines = [{"en": f"Return item {i} of the list.", "fr": f"Renvoie l'élément {i} de la liste."} for i in range(64)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    pairs = ["data.source=files", f"data.train_files=[{tmp_path}/pairs.jsonl]", f"data.eval_files=[{tmp_path}/pairs.jsonl]",
             "data.text_key=en", "data.target_key=fr", "data.target_seq_len=24", "data.num_shards=2"]
    # Three decoder layers to two encoder layers: Adafactor runs per layer of each stack.
    result = train(seq2seq_config(tmp_path / "run", *pairs, "train.steps=2", "model.num_decoder_layers=3"))
    assert result["tokens"] > 0 and result["step"] == 2
    with pytest.raises(ConfigError, match="data.target_key reads input-target pairs for model.family=encoder_decoder"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.target_key=fr"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"en": "only an input"}) + "\n")
    bad = [p.replace("pairs.jsonl", "bad.jsonl") for p in pairs]
    with pytest.raises(DataError, match="no usable text|no documents"):
        train(seq2seq_config(tmp_path / "bad", *bad, "train.steps=1"))
    assert not (tmp_path / "bad" / "config.yaml").exists()
