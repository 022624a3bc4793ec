"""SentencePiece training and loading."""

import numpy as np
import pytest

from t2x.data import TokenizerError, load_tokenizer, train_tokenizer
from t2x.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

_rng = np.random.default_rng(0)
_SYLLABLES = ["ka", "lo", "mi", "ne", "sut", "rap", "ve", "zor", "qui", "dem", "fal", "gri", "ho", "jun"]
_WORDS = ["".join(_rng.choice(_SYLLABLES, _rng.integers(1, 4))) for _ in range(400)]
TEXT = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.  Twice.\n\n\tTabbed line.",
    "Numbers like 12345 and 3.14159 appear in text.",
] + [" ".join(_rng.choice(_WORDS, 12)) for _ in range(500)]


def test_trained_tokenizer_round_trips_text_exactly(tmp_path):
    path = train_tokenizer(TEXT, 400, str(tmp_path / "sp"))
    tok = load_tokenizer(path)
    assert tok.vocab_size == 400
    assert (tok.processor.pad_id(), tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    for text in TEXT[:3] + ["unseen ✓ 漢字 😀 \x00 and  double  spaces\n\n\n"]:
        assert tok.decode(tok.encode([text])[0]) == text
    assert (tmp_path / "sp.vocab").read_text().count("\n") == 400


def test_too_small_a_vocabulary_is_reported(tmp_path):
    # 256 byte pieces, 4 specials and the newline leave no room for the text's characters.
    with pytest.raises(TokenizerError, match="262-piece"):
        train_tokenizer(TEXT, 262, str(tmp_path / "sp"))


def test_builtin_tokenizer_is_cached_and_has_the_asked_size():
    a = load_tokenizer("builtin:512")
    b = load_tokenizer("builtin:512")
    assert a.vocab_size == 512 and a.source == b.source


def test_bad_tokenizer_specs_are_reported(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(TokenizerError, match="builtin:N"):
        load_tokenizer("builtin:abc")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="holds neither"):
        load_tokenizer(str(tmp_path / "empty"))


def test_a_builtin_tokenizer_larger_than_the_corpus_allows_names_data_tokenizer():
    with pytest.raises(TokenizerError, match=r"data\.tokenizer=builtin:60000: the built-in corpus cannot give"):
        load_tokenizer("builtin:60000")
