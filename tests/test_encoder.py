"""The BERT-style encoder family: shapes, masked-LM corruption, training on every mesh,
exact resume, evaluation with fixed masks, and bad input."""

import json

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_COMMON, restored
from t2x.components import build
from t2x.config import ConfigError, ObjectiveConfig, load_config
from t2x.data.tokenizer import load_tokenizer
from t2x.families import masking_tokens
from t2x.models import abstract_params, build_model, count_params
from t2x.objectives import MaskingTokens, masked_lm
from t2x.parallel import batch_sharding, make_mesh
from t2x.train.loop import train
from test_train import MESHES, train_losses, train_on_every_mesh

BERT_TINY = REPO / "configs" / "bert_tiny.yaml"
# The test encoder: the tiny test shapes, 512 pieces and the mask token past them.
ENCODER = [o for o in TINY_COMMON if not o.startswith("model.vocab_size")] + ["model.vocab_size=576"]


def encoder_config(run_dir, *overrides):
    return load_config(BERT_TINY, [*ENCODER, f"train.run_dir={run_dir}", *overrides])


@pytest.mark.parametrize("size,published", [("base", 109_514_298), ("large", 335_174_458)])
def test_bert_configs_have_the_published_parameter_counts(size, published):
    cfg = load_config(REPO / "configs" / f"bert_{size}.yaml")
    params, _ = abstract_params(build_model(cfg.model), seq_len=8)
    assert count_params(params) == published  # transformers' BertForMaskedLM


def _rows(rng, batch=64, seq=256, vocab=1000, bos=2, eos=3):
    """Packed encoder rows: documents BOS ... EOS, then padding at the end of each row."""
    tokens = rng.integers(10, vocab, (batch, seq)).astype(np.int32)
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        cuts = sorted(rng.choice(np.arange(8, seq - 8), 2, replace=False))
        end = seq - rng.integers(0, 8)
        for seg, (a, b) in enumerate(zip([0, *cuts], [*cuts, end]), start=1):
            tokens[r, a], tokens[r, b - 1] = bos, eos
            segment_ids[r, a:b] = seg
            positions[r, a:b] = np.arange(b - a)
        tokens[r, end:] = 0
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def _chosen(example, tokens):
    """The [batch, seq] mask of the positions an example predicts, checked against its
    ``predict_at``: the chosen positions of each row in order, then unchosen ones."""
    at, weights = (np.asarray(example[k] if k == "weights" else example["model"][k]) for k in ("predict_at", "weights"))
    chosen = np.zeros(tokens.shape, bool)
    np.put_along_axis(chosen, at, weights > 0, axis=1)
    for row, w in zip(at, weights > 0):
        assert len(set(row)) == len(row)
        assert (np.diff(row[w]) > 0).all() and not w[w.sum():].any()  # chosen first, in order
    assert np.array_equal(np.asarray(example["targets"]), np.take_along_axis(tokens, at, axis=1))
    return chosen


def test_masked_lm_chooses_15_percent_of_text_tokens_and_corrupts_them_80_10_10():
    batch = _rows(np.random.default_rng(0))
    masking = MaskingTokens(mask=1000, vocab=1000, keep=(2, 3))
    example = masked_lm(batch, masking, ObjectiveConfig(), jax.random.key(7))
    assert example["weights"].shape == (64, 72)  # predictions at 72 of 256 positions a row
    inputs, chosen = np.asarray(example["model"]["tokens"]), _chosen(example, batch["tokens"])
    text = (batch["segment_ids"] > 0) & (batch["tokens"] != 2) & (batch["tokens"] != 3)
    assert not (chosen & ~text).any()  # never padding, BOS or EOS
    every = masked_lm(batch, masking, ObjectiveConfig(max_predictions=0), jax.random.key(7))
    assert "predict_at" not in every["model"] and np.array_equal(every["targets"], batch["tokens"])
    assert np.array_equal(np.asarray(every["weights"]) > 0, chosen)  # fewer than 72 chosen in every row
    assert np.array_equal(np.asarray(every["model"]["tokens"]), inputs)
    assert np.array_equal(inputs[~chosen], batch["tokens"][~chosen])  # the rest untouched
    assert chosen.sum() / text.sum() == pytest.approx(0.15, abs=0.01)
    masked = inputs[chosen] == 1000
    kept = inputs[chosen] == batch["tokens"][chosen]
    assert masked.mean() == pytest.approx(0.8, abs=0.02)
    assert kept.mean() == pytest.approx(0.1 + 0.1 / 1000, abs=0.02)  # unchanged, or replaced by itself
    assert (~masked & ~kept).mean() == pytest.approx(0.1, abs=0.02)
    assert (inputs[chosen & (inputs != 1000)] < 1000).all()  # random tokens come from the tokenizer's ids
    again = masked_lm(batch, masking, ObjectiveConfig(), jax.random.key(7))
    assert np.array_equal(np.asarray(again["model"]["tokens"]), inputs)
    other = masked_lm(batch, masking, ObjectiveConfig(), jax.random.key(8))
    assert not np.array_equal(_chosen(other, batch["tokens"]), chosen)


@pytest.mark.parametrize("whole_words", [False, True])
def test_a_row_predicts_at_most_max_predictions_tokens_chosen_at_random(whole_words):
    """Past the cap, the chosen tokens of the largest draws (whole words) are neither
    corrupted nor predicted; the others are exactly as without a cap."""
    tokenizer = load_tokenizer("builtin:512")
    text = ("Return a new list containing all items from the iterable in ascending order. A custom key function "
            "can be supplied to customize the sort order, and the reverse flag can be set to request the result "
            "in descending order. The algorithm uses only less-than comparisons between items. ") * 6
    pieces = tokenizer.encode([text])[0]
    tokens = np.array([[tokenizer.bos_id, *pieces[3 * r: 3 * r + 126], tokenizer.eos_id] for r in range(32)], np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(128, dtype=np.int32), tokens.shape)}
    masking = masking_tokens(tokenizer, 576)
    settings = {"whole_word_masking": whole_words, "mask_rate": 0.3}
    free = masked_lm(batch, masking, ObjectiveConfig(**settings, max_predictions=0), jax.random.key(5))
    capped = masked_lm(batch, masking, ObjectiveConfig(**settings, max_predictions=12), jax.random.key(5))
    assert capped["weights"].shape == (32, 12)
    every, chosen = np.asarray(free["weights"]) > 0, _chosen(capped, batch["tokens"])
    inputs, free_inputs = np.asarray(capped["model"]["tokens"]), np.asarray(free["model"]["tokens"])
    assert (every.sum(1) > 12).sum() > 16  # most rows choose more than 12
    assert not (chosen & ~every).any() and (chosen.sum(1) <= 12).all()
    assert np.array_equal(inputs[chosen], free_inputs[chosen])  # corrupted as without the cap
    assert np.array_equal(inputs[~chosen], batch["tokens"][~chosen])  # the rest untouched
    first = np.cumsum(every, 1) <= 12  # the first 12 chosen of each row
    assert not np.array_equal(chosen, every & first)  # not the first ones: random ones
    if not whole_words:
        assert np.array_equal(chosen.sum(1), np.minimum(every.sum(1), 12))
        return
    starts = masking.word_starts[batch["tokens"]] | (batch["positions"] == 0)
    assert chosen.any(1).all()
    for r in range(len(chosen)):  # every piece of a word, or none
        word = np.cumsum(starts[r])
        for w in np.unique(word[every[r]]):
            pieces = every[r] & (word == w)
            assert chosen[r][pieces].all() or not chosen[r][pieces].any()


def test_masks_do_not_depend_on_how_the_batch_is_sharded():
    batch = _rows(np.random.default_rng(1), batch=16, seq=64)
    masking = MaskingTokens(mask=1000, vocab=1000, keep=(2, 3))
    corrupt = jax.jit(lambda b: masked_lm(b, masking, ObjectiveConfig(), jax.random.key(3))["model"]["tokens"])
    one = np.asarray(corrupt(batch))
    for sizes in ({"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        from t2x.config import MeshConfig

        mesh = make_mesh(MeshConfig(**{"data": 1, "fsdp": 1, "tensor": 1, **sizes}))
        sharded = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
        assert np.array_equal(np.asarray(corrupt(sharded)), one), sizes


def test_whole_word_masking_takes_every_piece_of_a_word_or_none():
    tokenizer = load_tokenizer("builtin:512")
    texts = ["Return the concatenation of every unittest assertion, recursively normalized."] * 32
    documents = tokenizer.encode(texts)
    seq = max(len(d) for d in documents) + 2
    tokens = np.zeros((len(texts), seq), np.int32)
    for r, d in enumerate(documents):
        tokens[r, : len(d) + 2] = [tokenizer.bos_id, *d, tokenizer.eos_id]
    real = tokens > 0
    batch = {"tokens": tokens, "segment_ids": real.astype(np.int32),
             "positions": np.where(real, np.arange(seq), 0).astype(np.int32)}
    masking = masking_tokens(tokenizer, 576)
    starts = masking.word_starts[tokens]
    assert (~starts & real).any()  # the text has words of several pieces
    example = masked_lm(batch, masking, ObjectiveConfig(whole_word_masking=True, mask_rate=0.3), jax.random.key(0))
    chosen = _chosen(example, tokens)
    assert chosen.any()
    for r in range(len(texts)):
        word = np.cumsum(starts[r])  # word number of each piece
        for w in np.unique(word[chosen[r]]):
            pieces = (word == w) & real[r] & (tokens[r] != tokenizer.bos_id) & (tokens[r] != tokenizer.eos_id)
            assert chosen[r][pieces].all()


def test_encoder_trains_alike_on_every_mesh_resumes_exactly_and_restores_onto_another_mesh(tmp_path):
    common = ["train.steps=4", "checkpoint.every=2", "optim.decay_steps=4"]
    losses, evals = train_on_every_mesh(encoder_config, tmp_path, 4, *common[1:])
    for name in losses:
        assert evals[name]["tokens"] == evals["one_device"]["tokens"] > 0  # the same evaluation masks
        assert evals[name]["loss"] == pytest.approx(evals["one_device"]["loss"], rel=1e-5)
        assert 0 <= evals[name]["accuracy"] <= 1 and "bits_per_byte" not in evals[name]

    # Interrupted at step 2 and resumed: bitwise the uninterrupted run on the same mesh.
    mesh = MESHES["mixed222"][0]
    train(encoder_config(tmp_path / "resumed", *common, *mesh, "train.steps=2"))
    resumed = train(encoder_config(tmp_path / "resumed", *common, *mesh))
    assert [train_losses(tmp_path / "resumed")[s] for s in range(1, 5)] == list(losses["mixed222"])
    assert resumed == evals["mixed222"]
    # Its checkpoint restores onto another mesh, every parameter and moment as saved.
    moved, _ = restored(tmp_path / "resumed", *common, *MESHES["fsdp8"][0], make=encoder_config)
    here, _ = restored(tmp_path / "resumed", *common, *mesh, make=encoder_config)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(here)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert moved.params["blocks"]["layers"]["attn"]["query"]["kernel"].sharding != \
        here.params["blocks"]["layers"]["attn"]["query"]["kernel"].sharding


def test_encoder_input_that_cannot_work_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="too short to mask"):
        encoder_config(tmp_path / "short", "data.seq_len=3")
    too_small = encoder_config(tmp_path / "vocab", "model.vocab_size=512")
    with pytest.raises(ConfigError, match=r"reserved token.*model.vocab_size >= 513"):
        build(too_small)
    with pytest.raises(ConfigError, match="mask_token_rate"):
        encoder_config(tmp_path / "rates", "objective.mask_token_rate=0.9", "objective.random_token_rate=0.2")
    assert not (tmp_path / "vocab").exists()


def test_encoder_embeddings_pool_each_text_alone_whatever_it_is_batched_with():
    import flax.linen as nn

    from t2x.export import Exported
    from t2x.infer.engine import RequestError
    from t2x.infer.model import place
    from t2x.infer.score import Scorer

    cfg = encoder_config("/nonexistent", "model.init_std=0.3")
    module = build_model(cfg.model)
    params = jax.device_get(nn.unbox(module.init(jax.random.key(1), np.zeros((1, 8), np.int32))["params"]))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = place(Exported(cfg, params, tokenizer.files, {"kind": "test", "path": "encoder"}))
    texts = ["Return the sum.", "A much longer text, of several words, that pads the other rows of its batch."]
    scorer = Scorer(model, batch_size=2)
    for pooling in ("cls", "mean", "max"):
        together = scorer.embed(texts, pooling)
        for text, vector in zip(texts, together):
            ids = [tokenizer.bos_id, *tokenizer.encode([text])[0][: model.context - 2], tokenizer.eos_id]
            states = np.asarray(module.apply({"params": params}, np.asarray([ids], np.int32), hidden=True))[0]
            expected = {"cls": states[0], "mean": states[1:-1].mean(0), "max": states[1:-1].max(0)}[pooling]
            np.testing.assert_allclose(vector, expected, rtol=1e-4, atol=1e-5, err_msg=pooling)
    unit = scorer.embed(texts, "cls", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-6)
    with pytest.raises(RequestError, match="an encoder pools cls, mean, max"):
        scorer.embed(texts, "last")
    with pytest.raises(RequestError, match="only a decoder language model scores texts; this is an encoder"):
        scorer.score(texts)


def test_next_sentence_pairs_are_whole_half_random_and_trained_with_their_head(tmp_path):
    from t2x.data.sentence_pairs import IS_NEXT, sentence_pairs

    tokenizer = load_tokenizer("builtin:512")
    rng = np.random.default_rng(0)
    documents = [list(range(100 * (i + 1), 100 * (i + 1) + n)) for i, n in enumerate([40, 3, 25, 1, 60, 12] * 20)]
    token_bytes = [np.ones(len(d) + 1, np.int64) for d in documents]
    rows = sentence_pairs(documents, token_bytes, 32, tokenizer, rng)
    labels = []
    for r in range(len(rows["num_bytes"])):
        seg = rows["segment_ids"][r]
        for s in set(seg[seg > 0]):
            tokens, types = rows["tokens"][r][seg == s], rows["token_types"][r][seg == s]
            label = set(rows["next_sentence"][r][seg == s])
            assert len(label) == 1 and (rows["positions"][r][seg == s] == np.arange(len(tokens))).all()
            sep = np.flatnonzero(tokens == tokenizer.eos_id)
            assert tokens[0] == tokenizer.bos_id and len(sep) == 2 and sep[1] == len(tokens) - 1
            assert (types == (np.arange(len(tokens)) > sep[0])).all()
            a, b = tokens[1:sep[0]], tokens[sep[0] + 1:-1]
            labels.append(label.pop())
            assert (b[0] == a[-1] + 1) == (labels[-1] == IS_NEXT)  # documents are disjoint runs of ids
    assert 0.4 < np.mean(labels) < 0.6

    result = train(encoder_config(tmp_path / "nsp", "objective.next_sentence=true", "train.steps=3"))
    assert result["pairs"] > 0 and 0 <= result["next_sentence_accuracy"] <= 1
    logged = [json.loads(x) for x in (tmp_path / "nsp" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["next_sentence_loss"] > 0 for r in logged if r["split"] == "train" and "loss" in r)
    with pytest.raises(ConfigError, match="model.type_vocab_size=2"):
        encoder_config(tmp_path / "x", "objective.next_sentence=true", "model.type_vocab_size=0")


def test_the_masked_lm_head_at_the_chosen_positions_trains_and_evaluates_as_at_every_position(tmp_path):
    """The masked-LM head run at each row's chosen positions alone (the default cap, 16 of
    32 positions here) gives the eval sums and two train steps (of two micro-batches) of
    the head run at every position, on a sharded mesh, with the FLOPs of the positions it
    skips saved."""
    from t2x.bench import StepBench
    from t2x.evaluate import make_eval_step
    from t2x.flops import training_flops_per_step
    from t2x.parallel import sharding_context

    benches, sums = {}, {}
    for cap in (0, None):
        cfg = encoder_config(tmp_path, "objective.next_sentence=true", "model.type_vocab_size=2", "mesh.data=2",
                             "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum_steps=2",
                             f"objective.max_predictions={'null' if cap is None else 0}")
        bench = benches[cap] = StepBench(cfg, batches=2)
        with sharding_context(bench.mesh):
            step = jax.jit(make_eval_step(bench.model, cfg, build(cfg).tokenizer))
            sums[cap] = jax.device_get(step(bench.state.params, bench.device_batches[0], jax.numpy.int32(0)))
        bench.run(2)
    assert cfg.objective.predictions_per_row(cfg.data.seq_len) == 16
    assert sums[0].keys() == sums[None].keys() and sums[0]["tokens"] > 0
    for key, every in sums[0].items():
        assert sums[None][key] == pytest.approx(every, rel=1e-6), key
    every, chosen = benches[0], benches[None]
    for key in ("loss", "z_loss", "grad_norm", "param_norm", "next_sentence_loss"):
        assert chosen.last_metrics[key] == pytest.approx(every.last_metrics[key], rel=1e-5), key
    for x, y in zip(jax.tree.leaves(every.state.params), jax.tree.leaves(chosen.state.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    model, rows = cfg.model, cfg.train.global_batch_size
    saved = training_flops_per_step(model, rows, 32) - training_flops_per_step(model, rows, 32, predictions=16)
    # XLA's count of one device's step, whose loop over the 2 micro-batches it counts once
    per_device = [b.compiled.cost_analysis()["flops"] for b in (every, chosen)]
    assert (per_device[0] - per_device[1]) * 8 * 2 > 0.9 * saved
