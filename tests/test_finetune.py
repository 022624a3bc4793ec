"""Fine-tuning for classification: labelled data, step-indexed batches, the classifier
head, metrics, and a pretrained encoder fine-tuned past the majority class."""

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from test_encoder import ENCODER, encoder_config
from t2x.config import load_config
from t2x.data.labelled import LabelledBatches, read_labelled
from t2x.data.reader import DataError
from t2x.data.tokenizer import load_tokenizer
from t2x.export import ExportError
from t2x.families import classification_summary
from t2x.models import DecoderLM
from t2x.models.classifier import Classifier
from t2x.infer.model import load
from t2x.infer.score import Scorer
from t2x.train.loop import train
from test_server import call, serving

TOPICS = REPO / "configs" / "bert_tiny_topics.yaml"
LABELS = ["tkinter", "asyncio", "email", "logging", "xml"]
# The tiny test encoder as a classifier of the shipped topic set.
CLASSIFIER = [o for o in ENCODER if not o.startswith(("data.", "train.global_batch_size", "eval.max"))] + [
    "data.seq_len=32", "train.global_batch_size=32", "train.log_every=10",
]


def topics_config(run_dir, *overrides):
    return load_config(TOPICS, [*CLASSIFIER, f"train.run_dir={run_dir}", *overrides])


def test_labelled_examples_read_alike_from_jsonl_csv_and_tsv_and_bad_labels_are_named(tmp_path):
    examples = [("Return the first item, or None.", "tkinter"), ('Quote "this", then\ta tab.', "email")] * 3
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t, "topic": y}) + "\n" for t, y in examples))
    for fmt, sep in (("csv", ","), ("tsv", "\t")):
        import csv

        with open(tmp_path / f"a.{fmt}", "w", newline="") as f:
            writer = csv.writer(f, delimiter=sep)
            writer.writerows([("topic", "body"), *[(y, t) for t, y in examples]])
    tokenizer = load_tokenizer("builtin:512")
    read = {}
    for fmt in ("jsonl", "csv", "tsv"):
        cfg = topics_config(tmp_path / "run", f"data.train_files=[{tmp_path}/a.{fmt}]", "data.text_key=body",
                            "classify.label_key=topic", "data.seq_len=8")
        read[fmt] = read_labelled(cfg, "train", tokenizer)
    for fmt in ("csv", "tsv"):
        assert np.array_equal(read[fmt].tokens, read["jsonl"].tokens) and np.array_equal(read[fmt].labels, read["jsonl"].labels)
    rows = read["jsonl"]
    assert rows.labels.tolist() == [0, 2] * 3
    assert (rows.tokens[:, 0] == tokenizer.bos_id).all() and rows.truncated == 6  # every text is cut to 8 tokens
    assert (rows.tokens[np.arange(6), rows.lengths - 1] == tokenizer.eos_id).all()

    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x", "topic": "tkinter"}) + "\n"
                                        + json.dumps({"body": "y", "topic": "turtle"}) + "\n")
    cfg = topics_config(tmp_path / "run", f"data.train_files=[{tmp_path}/bad.jsonl]", "data.text_key=body",
                        "classify.label_key=topic")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: label 'turtle' is not in classify.labels"):
        read_labelled(cfg, "train", tokenizer)
    cfg = topics_config(tmp_path / "run", f"data.train_files=[{tmp_path}/a.csv]", "data.text_key=text")
    with pytest.raises(DataError, match=r"no column 'text'"):
        read_labelled(cfg, "train", tokenizer)


def test_batches_follow_from_the_step_and_split_over_processes():
    cfg = topics_config("unused")
    rows = read_labelled(cfg, "train", load_tokenizer("builtin:512"))
    whole = LabelledBatches(rows, 32, seed=0, process_rows=range(32))
    first = [next(whole) for _ in range(60)]  # past the first epoch's end (1,275 examples)
    resumed = LabelledBatches(rows, 32, seed=0, process_rows=range(32), start_step=45)
    batch = next(resumed)
    assert all(np.array_equal(batch[k], first[45][k]) for k in first[45])
    halves = [LabelledBatches(rows, 32, seed=0, process_rows=r, start_step=7) for r in (range(0, 32, 2), range(1, 32, 2))]
    a, b = next(halves[0]), next(halves[1])
    assert np.array_equal(np.stack([a["labels"], b["labels"]], 1).reshape(-1), first[7]["labels"])
    epoch = np.concatenate([whole.indices(s) for s in range(len(rows) // 32)])
    assert len(set(epoch.tolist())) == len(epoch)  # no example twice within an epoch


def test_classification_summary_formulas():
    confusion = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    out = classification_summary({"nll_sum": 5.0, "confusion": confusion, "tokens": 10}, ("a", "b", "c"))
    f1_a, f1_b = 2 * 5 / (6 + 7), 2 * 2 / (4 + 3)
    assert out["accuracy"] == 0.7 and out["majority_accuracy"] == 0.6 and out["loss"] == 0.5
    assert out["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)  # "c" neither occurs nor is predicted
    assert out["f1"] == pytest.approx({"a": f1_a, "b": f1_b}) and out["confusion_matrix"] == confusion.tolist()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_decoder_classifier_pools_its_final_states(pooling):
    cfg = encoder_config("unused").model
    import dataclasses

    cfg = dataclasses.replace(cfg, family="decoder", norm_position="pre", embed_norm=False, type_vocab_size=0)
    model = Classifier(cfg, 3, pooling)
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 500, (2, 10)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4], jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens, None, segment_ids)["params"])
    logits = model.apply({"params": params}, tokens, None, segment_ids)
    states = np.asarray(DecoderLM(cfg).apply({"params": params["backbone"]}, tokens, None, segment_ids, hidden=True))
    pooled = states[[0, 1], [9, 5]] if pooling == "last" else np.stack([states[0].mean(0), states[1, :6].mean(0)])
    assert "bias" not in params["classifier"]  # as transformers' GPT2ForSequenceClassification.score
    expected = pooled @ np.asarray(params["classifier"]["kernel"])
    np.testing.assert_allclose(np.asarray(logits)[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_a_pretrained_encoder_fine_tunes_past_the_majority_class(tmp_path, caplog):
    train(encoder_config(tmp_path / "pre", "train.steps=2"))
    start = [f"data.tokenizer={tmp_path / 'pre'}", f"train.init_from={tmp_path / 'pre'}"]
    with pytest.raises(ExportError, match="model.family=encoder, this run model.family=decoder"):
        train(topics_config(tmp_path / "wrong", *start, "model.family=decoder", "model.norm_position=pre",
                            "model.type_vocab_size=0", "model.embed_norm=false", "classify.pooling=last"))
    assert not (tmp_path / "wrong" / "config.yaml").exists()
    with caplog.at_level(logging.INFO, logger="t2x.train.loop"):
        result = train(topics_config(tmp_path / "ft", *start, "train.steps=100", "optim.lr=3e-3",
                                     "optim.warmup_steps=10", "classify.pooling=mean", "model.dropout=0.0",
                                     "checkpoint.every=100", "eval.every=0"))
    assert "not used: mlm_bias, mlm_dense/bias, mlm_dense/kernel, mlm_norm/bias, mlm_norm/scale; new: classifier" in caplog.text
    assert result["examples"] == 326 == int(np.sum(result["confusion_matrix"]))
    assert result["labels"] == LABELS
    assert result["accuracy"] > result["majority_accuracy"] + 0.15  # 0.396 for always "tkinter"

    # Served: /v1/classify answers as the evaluation did; what a classifier does not do is a 422.
    model = load(str(tmp_path / "ft"))
    lines = (REPO / "t2x/data/sets/stdlib_topics/validation.jsonl").read_text().splitlines()[:8]
    texts, truth = [json.loads(x)["text"] for x in lines], [json.loads(x)["label"] for x in lines]
    classes = Scorer(model, batch_size=8).classify(texts)
    assert all(abs(sum(c["probabilities"].values()) - 1) < 1e-5 for c in classes)
    with serving(model) as url:
        status, body = call(url, "/v1/classify", {"texts": texts})
        assert status == 200 and json.loads(body)["classes"] == classes
        for path, request in (("/v1/generate", {"prompt": "x"}), ("/v1/embed", {"texts": ["x"]}),
                              ("/v1/score", {"texts": ["x"]})):
            status, body = call(url, path, request)
            assert status == 422 and json.loads(body)["error"]["field"] == "model", (path, body)
    assert sum(c["label"] == t for c, t in zip(classes, truth)) >= 4


def test_an_encoder_decoder_fine_tunes_its_encoder_as_a_classifier(tmp_path, caplog):
    from t2x.config import ConfigError
    from t2x.export import write_export
    from t2x.models import abstract_params
    from t2x.models.encdec import EncoderDecoder
    from test_seq2seq import seq2seq_config

    # A T5's export (random parameters) is the start: its encoder and embedding are taken.
    t5 = seq2seq_config(tmp_path / "unused")
    shapes, _ = abstract_params(EncoderDecoder(t5.model), 8)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape).astype(np.float32), shapes)
    tokenizer = load_tokenizer(t5.data.tokenizer)
    write_export(str(tmp_path / "t5"), t5, params, tokenizer.files, {"kind": "test", "path": "t5"}, "float32")
    topics = ["data.source=files", f"data.train_files=[{REPO}/t2x/data/sets/stdlib_topics/train.jsonl]",
              f"data.eval_files=[{REPO}/t2x/data/sets/stdlib_topics/validation.jsonl]", f"classify.labels=[{','.join(LABELS)}]",
              "classify.label_key=label", f"data.tokenizer={tmp_path / 't5'}", f"train.init_from={tmp_path / 't5'}"]
    with pytest.raises(ConfigError, match="classify.pooling=cls pools an encoder's first"):
        seq2seq_config(tmp_path / "cls", *topics, "classify.pooling=cls")
    with caplog.at_level(logging.INFO, logger="t2x.train.loop"):
        result = train(seq2seq_config(tmp_path / "ft", *topics, "train.steps=2"))
    import re

    assert re.search(r"not used: decoder/[^;\n]*; new: classifier\n", caplog.text)
    assert result["labels"] == LABELS and result["step"] == 2
    # Its logits are the encoder's states, mean-pooled over the text, through the head.
    trained = load(str(tmp_path / "ft"))
    assert trained.cfg.classify.pooling == "auto" and trained.module.pooling == "mean"
    tokens = np.asarray(np.random.default_rng(1).integers(4, 500, (2, 10)), np.int32)
    segment_ids = np.asarray([[1] * 10, [1] * 6 + [0] * 4], np.int32)
    p = jax.device_get(trained.params)
    logits = np.asarray(trained.module.apply({"params": p}, tokens, None, segment_ids))[:, 0]
    states = np.asarray(EncoderDecoder(t5.model).apply({"params": p["backbone"]}, tokens, None, segment_ids,
                                                       method="encode"))
    pooled = np.stack([states[0].mean(0), states[1, :6].mean(0)])
    head = p["classifier"]  # no bias: T5 has none (model.use_bias)
    assert "bias" not in head
    np.testing.assert_allclose(logits, pooled @ head["kernel"], rtol=1e-5, atol=1e-5)
