"""T5 span corruption and pair packing, against T5's published lengths and by
reconstructing the text from input and target."""

import numpy as np
import pytest

from t2x.data.span_corruption import SpanCorruption, corrupt, corrupted_lengths, noise_mask, raw_length


def test_piece_lengths_are_t5s():
    # T5's random_spans_helper: 568 raw tokens give 512 input and 114 target tokens.
    assert raw_length(512, None, 0.15, 3.0) == 568
    assert corrupted_lengths(568, 0.15, 3.0) == (512, 114)


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
