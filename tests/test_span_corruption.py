"""T5 span corruption and pair packing, against T5's published lengths and by
reconstructing the text from input and target."""

import numpy as np
import pytest

from t2x.data.span_corruption import SpanCorruption, corrupt, corrupted_lengths, noise_mask, raw_length


def test_piece_lengths_are_t5s():
    # T5's random_spans_helper: 568 raw tokens give 512 input and 114 target tokens.
    assert raw_length(512, None, 0.15, 3.0) == 568
    assert corrupted_lengths(568, 0.15, 3.0) == (512, 114)


def test_rows_too_short_to_corrupt_are_refused_by_name():
    from conftest import REPO
    from t2x.config import ConfigError, load_config

    t5 = REPO / "configs" / "t5_tiny.yaml"
    assert corrupted_lengths(2, 0.15, 3.0) == (3, 3)  # one kept token, a sentinel, EOS; a sentinel, the noise, EOS
    with pytest.raises(ConfigError, match=r"data.seq_len \(2\) is too short to corrupt.*set data.seq_len >= 3"):
        load_config(t5, ["data.seq_len=2"])
    with pytest.raises(ConfigError, match=r"data.target_seq_len \(2\) is too short to corrupt"):
        load_config(t5, ["data.target_seq_len=2"])
    assert load_config(t5, ["data.seq_len=3", "data.target_seq_len=3"]).data.seq_len == 3


@pytest.mark.parametrize("length", [2, 3, 17, 100, 568])
def test_noise_masks_have_t5s_counts_and_alternate_starting_with_kept_tokens(length):
    rng = np.random.default_rng(length)
    for _ in range(20):
        mask = noise_mask(length, 0.15, 3.0, rng)
        noise = min(max(round(length * 0.15), 1), length - 1)
        assert mask.shape == (length,) and mask.sum() == noise and not mask[0]
        spans = int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
        assert spans == min(max(round(noise / 3.0), 1), noise, length - noise)


def test_input_and_target_give_back_the_text():
    rng = np.random.default_rng(0)
    sentinels = np.arange(1000, 1100)
    for length in (2, 9, 50, 300):
        tokens = rng.integers(10, 900, length)
        mask = noise_mask(length, 0.15, 3.0, rng)
        inputs, targets = corrupt(tokens, mask, sentinels, eos=3)
        assert inputs[-1] == targets[-1] == 3
        assert (len(inputs), len(targets)) == corrupted_lengths(length, 0.15, 3.0)
        # Put each sentinel's span back where the sentinel stands in the input.
        spans, current = {}, None
        for t in targets[:-1]:
            if t >= 1000:
                current = spans.setdefault(t, [])
            else:
                current.append(t)
        restored = [x for t in inputs[:-1] for x in (spans[t] if t >= 1000 else [t])]
        assert restored == tokens.tolist()
        assert sorted(spans) == list(range(1000, 1000 + len(spans)))  # sentinels in order, from the first


def test_pairs_pack_into_encoder_and_decoder_rows_with_shared_segments():
    corruption = SpanCorruption(0.15, 3.0, seq_len=32, target_len=12, first_sentinel=512)
    rng = np.random.default_rng(0)
    documents = [list(range(10, 10 + n)) for n in (5, 30, 60, 3, 1, 12)]
    token_bytes = [np.ones(len(d) + 1, np.int64) for d in documents]
    rows = corruption.pack(documents, token_bytes, rng, eos_id=3)
    assert rows["tokens"].shape[1] == 32 and rows["targets"].shape[1] == 12
    assert rows["num_bytes"].sum() == sum(len(d) + 1 for d in documents if len(d) >= 2)  # the 1-token one is dropped
    for r in range(len(rows["num_bytes"])):
        enc, dec = rows["segment_ids"][r], rows["target_segment_ids"][r]
        assert set(enc[enc > 0]) == set(dec[dec > 0])  # each pair in both rows, under one id
        for segment in set(enc[enc > 0]):
            assert rows["tokens"][r][enc == segment][-1] == 3 and rows["targets"][r][dec == segment][-1] == 3
            assert (rows["positions"][r][enc == segment] == np.arange((enc == segment).sum())).all()
    assert rows["targets"].max() < 512 + corruption.sentinels


def _rows(cfg, split="train"):
    from t2x.data.pipeline import ShardPosition, shard_rows
    from t2x.data.reader import DataStats
    from t2x.data.sources import Source
    from t2x.data.tokenizer import load_tokenizer
    from t2x.families import encoder_decoder_rows

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    rows = shard_rows(Source(cfg.data, split), tokenizer, cfg.data, 0, 0, ShardPosition(), False, DataStats(),
                      encoder_decoder_rows(cfg, tokenizer))
    return tokenizer, list(rows.as_numpy_iterator())


def test_pairs_from_jsonl_and_tsv_become_the_same_rows(tmp_path):
    import json

    from conftest import tiny_config

    pairs = [("Translate this line.", "Traduire cette ligne."), ("Short.", "Court."), ("Lonely", None)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"src": a, "tgt": b}) + "\n" for a, b in pairs))
    (tmp_path / "p.tsv").write_text("".join(f"{a}\t{b}\n" if b else f"{a}\n" for a, b in pairs))
    common = ["model.family=encoder_decoder", "data.source=files", "data.text_key=src", "data.target_key=tgt",
              "data.num_shards=1", "train.global_batch_size=8", "eval.global_batch_size=8", "data.seq_len=16",
              "data.target_seq_len=12"]
    got = {}
    for suffix in ("jsonl", "tsv"):
        cfg = tiny_config(tmp_path, *common, f"data.train_files=[{tmp_path}/p.{suffix}]")
        tokenizer, got[suffix] = _rows(cfg)
    assert len(got["jsonl"]) == len(got["tsv"]) >= 1
    for a, b in zip(got["jsonl"], got["tsv"]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    found = [(r["tokens"][r["segment_ids"] == k].tolist(), r["targets"][r["target_segment_ids"] == k].tolist())
             for r in got["jsonl"] for k in range(1, r["segment_ids"].max() + 1)]
    expected = [([*ids[0], tokenizer.eos_id][:16], [*ids[1], tokenizer.eos_id][:12])  # cut to the rows
                for ids in (tokenizer.encode([a, b]) for a, b in pairs[:2])]
    assert found == expected  # the pair without a target is skipped


def test_span_corruption_runs_in_the_pipeline_and_is_the_same_when_read_again(tmp_path):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, "model.family=encoder_decoder", "data.seq_len=32", "model.vocab_size=576")
    tokenizer, first = _rows(cfg)
    _, again = _rows(cfg)
    assert first[0]["targets"].shape == (8,)  # 34 raw tokens: 5 noise in 2 spans -> 32 input, 8 target tokens
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first[:50], again[:50]) for k in a)
    sentinels = [t for r in first[:50] for t in r["targets"] if t >= tokenizer.vocab_size]
    assert sentinels and max(sentinels) < 576
