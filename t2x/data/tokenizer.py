"""SentencePiece tokenizers: train, load, and the cached built-in one.

A tokenizer spec is a path to a SentencePiece ``.model`` file, or ``builtin:N``: the model
t2x trains with N pieces on the built-in corpus's train split, cached after first use.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _gfile():
    """tf.io.gfile (local or remote paths), imported only by what reads or writes files:
    a ``Tokenizer`` made from model bytes needs no TensorFlow."""
    import tensorflow as tf

    return tf.io.gfile

MAX_TRAINING_LINES = 2_000_000
# SentencePiece's result depends on its thread count: a fixed count makes training give
# the same model on every machine.
TRAINING_THREADS = 16


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or used; the message names what to change."""


class Tokenizer:
    """A SentencePiece model plus the ids t2x needs (BOS, EOS)."""

    def __init__(self, model_proto: bytes, source: str):
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.source = source
        self.eos_id = self.processor.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(f"tokenizer {source} defines no EOS piece; t2x ends every document with EOS")
        # Models without BOS (T5's, for one) start documents with EOS, as GPT-2 does.
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else self.eos_id
        self._piece_bytes = self._bytes_per_piece()

    def _bytes_per_piece(self) -> np.ndarray:
        """UTF-8 bytes of text each piece stands for: a byte-fallback piece 1, control
        pieces 0, others their text with SentencePiece's word-boundary mark as a space."""
        sp = self.processor
        sizes = np.zeros(sp.get_piece_size(), np.int64)
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                sizes[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                sizes[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return sizes
    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added)."""
        return self.processor.encode(texts, out_type=int, num_threads=min(4, os.cpu_count() or 1))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def token_bytes(self, documents: Sequence[Sequence[int]], texts: Sequence[str], separators: Sequence[int]) -> list[np.ndarray]:
        """Bytes of text each token stands for, and then the EOS's (its separator).

        Each document's counts add up exactly to the UTF-8 bytes of its text: pieces count
        their own text, and the difference (a dummy-prefix space, or what a normalizer
        changed) goes to the document's first token.

        Returns:
          For each document, ``len(tokens) + 1`` integers.
        """
        lengths = np.array([len(d) for d in documents], np.int64)
        flat = np.concatenate([np.asarray(d, np.int64) for d in documents]) if lengths.sum() else np.zeros(0, np.int64)
        sizes = self._piece_bytes[flat]
        starts = np.cumsum(lengths) - lengths
        counted = np.add.reduceat(sizes, starts) if len(sizes) else np.zeros(len(documents), np.int64)
        counted = np.where(lengths > 0, counted, 0)  # reduceat gives an element, not 0, for an empty range
        exact = np.array([len(t.encode("utf-8")) for t in texts], np.int64)
        out = []
        for i, (start, length) in enumerate(zip(starts, lengths)):
            per_token = np.empty(length + 1, np.int64)
            per_token[:length] = sizes[start:start + length]
            per_token[length] = separators[i]
            per_token[0] += exact[i] - counted[i]  # to the EOS when the document has no tokens
            out.append(per_token)
        return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_prefix: str, model_type: str = "unigram") -> str:
    """Train a SentencePiece model and write ``PREFIX.model`` and ``PREFIX.vocab``.

    The model keeps text exactly (identity normalization, whitespace and newlines kept,
    byte fallback for anything unseen), so ``decode(encode(text)) == text``. Training is
    deterministic: the same texts give the same model bytes on any machine.

    Args:
      texts: training documents.
      vocab_size: number of pieces, specials included.
      output_prefix: path prefix of the written files.
      model_type: ``unigram`` or ``bpe``.

    Returns:
      Path of the ``.model`` file.
    """
    if os.path.dirname(output_prefix):
        _gfile().makedirs(os.path.dirname(output_prefix))
    model = io.BytesIO()
    try:
        _train(texts, vocab_size, model_type, model)
    except RuntimeError as e:  # SentencePiece reports bad settings as RuntimeError
        raise TokenizerError(f"SentencePiece could not train a {vocab_size}-piece model: {e}") from None
    path = f"{output_prefix}.model"
    tmp = f"{path}.tmp-{os.getpid()}"
    gfile = _gfile()
    with gfile.GFile(tmp, "wb") as f:
        f.write(model.getvalue())
    gfile.rename(tmp, path, overwrite=True)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with gfile.GFile(f"{output_prefix}.vocab", "w") as f:
        for i in range(processor.get_piece_size()):
            piece = processor.id_to_piece(i).replace("\n", "\\n")  # one line per piece
            f.write(f"{piece}\t{processor.get_score(i)}\n")
    return path


def _train(texts: Iterable[str], vocab_size: int, model_type: str, model: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        user_defined_symbols=["\n"],
        character_coverage=0.9995,
        max_sentence_length=1 << 14,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=TRAINING_THREADS,
        minloglevel=2,
    )


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of the texts ("\\n" is a piece of its own), reservoir-sampled
    down to MAX_TRAINING_LINES so huge inputs train in bounded memory."""
    reservoir: list[str] = []
    rng = random.Random(0)
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            seen += 1
            if len(reservoir) < MAX_TRAINING_LINES:
                reservoir.append(line)
            else:
                j = rng.randrange(seen)
                if j < MAX_TRAINING_LINES:
                    reservoir[j] = line
    if not reservoir:
        raise TokenizerError("no text to train the tokenizer on: the input has no non-empty lines")
    yield from reservoir


def builtin_tokenizer_path(vocab_size: int) -> str:
    """Path of the cached tokenizer for the built-in corpus (trained on first use)."""
    from t2x.data import corpus
    from t2x.data.sources import read_texts

    prefix = corpus.cache_dir() / "tokenizers" / f"{corpus.corpus_dir().name}-unigram-{vocab_size}-t{TRAINING_THREADS}"
    path = f"{prefix}.model"
    if not os.path.exists(path):
        train_tokenizer(read_texts([corpus.split_file("train")]), vocab_size, str(prefix))
    return path


def resolve_tokenizer(spec: str) -> str:
    """The ``.model`` path a tokenizer spec names (training the built-in one if needed)."""
    if spec.startswith("builtin:"):
        size = spec.split(":", 1)[1]
        if not size.isdigit():
            raise TokenizerError(f"data.tokenizer {spec!r}: builtin:N needs a number of pieces N")
        return builtin_tokenizer_path(int(size))
    if not _gfile().exists(spec):
        raise TokenizerError(
            f"data.tokenizer: no SentencePiece model at {spec!r}; train one with "
            "`t2x tokenizer train` or use builtin:N"
        )
    return spec


def load_tokenizer(spec: str) -> Tokenizer:
    """Load the tokenizer a spec names (a ``.model`` path or ``builtin:N``)."""
    path = resolve_tokenizer(spec)
    with _gfile().GFile(path, "rb") as f:
        proto = f.read()
    try:
        return Tokenizer(proto, source=path)
    except RuntimeError as e:
        raise TokenizerError(f"data.tokenizer: {path} is not a SentencePiece model ({e})") from None
