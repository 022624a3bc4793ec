"""Concatenate-and-split packing: every token kept once, pieces numbered, bytes counted once."""

import numpy as np
import pytest

from t2x.data.packing import pack_documents

EOS = 3


def test_small_example_by_hand():
    token_bytes = [np.array([2, 3, 1]), np.array([1, 2, 3, 4, 0]), np.array([7, 1])]  # EOS last
    rows = pack_documents([[10, 11], [20, 21, 22, 23], [30]], token_bytes, seq_len=4, eos_id=EOS)
    np.testing.assert_array_equal(rows["tokens"], [[10, 11, EOS, 20], [21, 22, 23, EOS], [30, EOS, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0]])
    # A row counts the bytes its own tokens stand for, even when a document continues.
    np.testing.assert_array_equal(rows["num_bytes"], [2 + 3 + 1 + 1, 2 + 3 + 4 + 0, 7 + 1])


@pytest.mark.parametrize("seed", range(5))
def test_random_documents_are_kept_whole_and_in_order(seed):
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(4, 100, rng.integers(0, 40))) for _ in range(rng.integers(1, 30))]
    token_bytes = [rng.integers(0, 5, len(d) + 1) for d in docs]
    rows = pack_documents(docs, token_bytes, seq_len=16, eos_id=EOS)
    seg, pos, tok = rows["segment_ids"], rows["positions"], rows["tokens"]
    assert tok.shape[1] == 16 and tok.dtype == np.int32
    expected = np.concatenate([np.append(np.asarray(d, np.int64), EOS) for d in docs])
    np.testing.assert_array_equal(tok[seg > 0], expected)
    assert rows["num_bytes"].sum() == sum(int(b.sum()) for b in token_bytes)
    assert (seg[-1] == 0).sum() < 16 and (seg[:-1] > 0).all(), "only the last row is padded"
    for r in range(len(tok)):
        for s in set(seg[r][seg[r] > 0]):
            np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
        # Segment ids count up from 1 in order of appearance.
        ids = seg[r][seg[r] > 0]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)


def test_no_documents_give_no_rows():
    rows = pack_documents([], [], seq_len=8, eos_id=EOS)
    assert rows["tokens"].shape == (0, 8)
