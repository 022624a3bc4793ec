"""Held-out evaluation is exact: every token once, padding ignored, checked against float64 NumPy."""

import json
import math

import jax
import numpy as np
import pytest

import reference
from conftest import tiny_config
from t2x.components import build
from t2x.evaluate import Evaluator
from t2x.families import language_model_summary as summarize
from t2x.parallel import sharding_context
from t2x.train.state import init_state, make_optimizer, state_shardings


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["parse", "the", "given", "string", "return", "None", "if", "value", "ünïcode", "list", "of", "items"]
    texts = [" ".join(rng.choice(words, rng.integers(2, 30))) for _ in range(15)]
    path = tmp_path_factory.mktemp("eval") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path), texts


def evaluate(cfg, devices=None):
    c = build(cfg, devices=devices)
    tx, _ = make_optimizer(cfg)
    with sharding_context(c.mesh):
        _, shardings = state_shardings(c.model, tx, c.mesh, cfg.data.seq_len)
        params = init_state(c.model, tx, shardings, seed=1, seq_len=cfg.data.seq_len).params
        evaluator = Evaluator(cfg, c.tokenizer, c.model, c.mesh, shardings.params)
        return c, evaluator, params, evaluator(params)


def files_config(tmp_path, path, *extra):
    return tiny_config(tmp_path, "data.source=files", f"data.train_files=[{path}]", f"data.eval_files=[{path}]",
                       "data.num_shards=2", "eval.max_batches=null", *extra)


def test_perplexity_matches_a_float64_reference_over_the_whole_split(tmp_path, corpus):
    path, texts = corpus
    cfg = files_config(tmp_path, path, "eval.global_batch_size=4", "mesh.data=4", "mesh.tensor=2")
    c, evaluator, params, result = evaluate(cfg)
    nll, tokens, num_bytes = 0.0, 0, 0
    for batch in evaluator.dataset.as_numpy_iterator():
        if not batch["segment_ids"].any():
            break
        num_bytes += int(batch["num_bytes"].sum())
        for row, segments in zip(batch["tokens"], batch["segment_ids"]):
            for s in set(segments[segments > 0]):
                piece = row[segments == s]
                inputs = np.concatenate([[c.tokenizer.bos_id], piece[:-1]])[None]
                logits = reference.forward(params, cfg.model, inputs, np.arange(len(piece))[None], np.ones_like(inputs))
                nll -= reference.log_softmax(logits)[0, np.arange(len(piece)), piece].sum()
                tokens += len(piece)
    assert tokens == sum(len(ids) + 1 for ids in c.tokenizer.encode(texts)), "every token counted once"
    assert num_bytes == sum(len(t.encode()) for t in texts)
    assert result["tokens"] == tokens and result["bytes"] == num_bytes
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-5)


def test_result_does_not_depend_on_batch_size_or_mesh(tmp_path, corpus):
    path, _ = corpus
    *_, small = evaluate(files_config(tmp_path, path, "eval.global_batch_size=2", "mesh.data=1"), jax.devices()[:1])
    *_, large = evaluate(files_config(tmp_path, path, "eval.global_batch_size=16", "mesh.data=2", "mesh.tensor=4"))
    assert small["tokens"] == large["tokens"] and small["bytes"] == large["bytes"]
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-6)
    assert small["batches"] > large["batches"]


def test_summary_formulas():
    out = summarize(nll_sum=200.0, tokens=100, num_bytes=400)
    assert out["loss"] == 2.0 and out["perplexity"] == pytest.approx(math.exp(2.0))
    assert out["bits_per_byte"] == pytest.approx(200 / math.log(2) / 400)
    assert summarize(nll_sum=200.0, tokens=100, num_bytes=0)["bits_per_byte"] is None


def test_documents_are_counted_by_their_evaluated_end(tmp_path, corpus):
    path, texts = corpus
    *_, whole = evaluate(files_config(tmp_path, path, "eval.global_batch_size=8", "mesh.data=8"))
    assert whole["documents"] == len(texts)
    *_, capped = evaluate(files_config(tmp_path, path, "eval.global_batch_size=8", "mesh.data=8", "eval.max_batches=1"))
    assert 0 < capped["documents"] < len(texts) and capped["batches"] == 1
