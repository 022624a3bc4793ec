"""Tokenizers: SentencePiece models (trained by t2x, or brought) and Hugging Face
``tokenizer.json`` files; training, loading, and the cached built-in one.

A tokenizer spec is one of:

- ``builtin:N``: the SentencePiece model t2x trains with N pieces on the built-in
  corpus's train split, cached after first use;
- a path to a SentencePiece ``.model`` file;
- a path to a Hugging Face ``tokenizer.json`` (its special tokens are read from the
  ``tokenizer_config.json`` beside it, when there is one);
- a directory holding either (a run directory, or an export).

A tokenizer is its files (``Tokenizer.files``): run directories and exports keep a copy
of them, so a run always tokenizes as it started.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
FILES = (SENTENCEPIECE_FILE, HF_FILE, HF_CONFIG_FILE)  # every file a tokenizer may consist of
# End-of-sequence tokens of common Hugging Face tokenizers, for a tokenizer.json that comes
# without a tokenizer_config.json naming its own.
_KNOWN_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
_KNOWN_MASK = ("[MASK]", "<mask>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _gfile():
    """tf.io.gfile (local or remote paths), imported only by what reads or writes files:
    a ``Tokenizer`` made from model bytes needs no TensorFlow, and where TensorFlow is not
    installed (a GPU machine for the model and step alone) local files are read without it."""
    try:
        import tensorflow as tf
    except ImportError:
        return _LocalFiles
    return tf.io.gfile


class _LocalFiles:
    """The few ``tf.io.gfile`` calls tokenizers make, for local paths, without TensorFlow."""

    @staticmethod
    def _local(path: str) -> str:
        if "://" in path:
            raise TokenizerError(f"{path}: reading a remote path needs TensorFlow (tf.io.gfile), which is not "
                                 "installed; install tensorflow or copy the tokenizer to a local path")
        return path

    exists = staticmethod(lambda path: os.path.exists(_LocalFiles._local(path)))
    isdir = staticmethod(lambda path: os.path.isdir(_LocalFiles._local(path)))
    makedirs = staticmethod(lambda path: os.makedirs(_LocalFiles._local(path), exist_ok=True))
    GFile = staticmethod(lambda path, mode="r": open(_LocalFiles._local(path), mode))

    @staticmethod
    def rename(src: str, dst: str, overwrite: bool = False) -> None:
        if not overwrite and os.path.exists(dst):
            raise FileExistsError(dst)
        os.replace(_LocalFiles._local(src), _LocalFiles._local(dst))

MAX_TRAINING_LINES = 2_000_000
# SentencePiece's result depends on its thread count: a fixed count makes training give
# the same model on every machine.
TRAINING_THREADS = 16


MASK_PIECE = "<mask>"  # a SentencePiece model's mask token, when it defines one
SENTINEL_PIECE = "<extra_id_{}>"  # T5's k-th span-corruption sentinel, when a tokenizer has its own


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or used; the message names what to change."""


class Tokenizer:
    """What t2x needs of a tokenizer: ids of texts and back, BOS and EOS, and the UTF-8
    bytes each token stands for (bits per byte). Subclasses hold the model."""

    source: str
    bos_id: int
    eos_id: int
    files: dict[str, bytes]  # the files that make it, by name (FILES)
    mask_id: int | None  # its own mask token (BERT's [MASK]), when it has one
    _piece_bytes: np.ndarray  # UTF-8 bytes of text each id stands for

    @property
    def vocab_size(self) -> int:
        return len(self._piece_bytes)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of its files (of a SentencePiece model's bytes alone)."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            if len(self.files) > 1:
                digest.update(f"{name}\0{len(self.files[name])}\0".encode())
            digest.update(self.files[name])
        return digest.hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; special tokens (BOS, EOS, padding) decode to nothing."""
        raise NotImplementedError

    def word_starts(self) -> np.ndarray:
        """bool [vocab_size]: whether each piece begins a word (whole-word masking keeps
        a word's pieces together). Special pieces count as words of their own."""
        raise NotImplementedError

    def piece_id(self, piece: str) -> int | None:
        """The id of the token spelled ``piece``, if the vocabulary has one."""
        raise NotImplementedError

    def sentinel_ids(self) -> list[int]:
        """The ids of its own span-corruption sentinels, ``<extra_id_0>``, ``<extra_id_1>``,
        ... in that order, up to the first it lacks (an imported T5's hold 100, counting
        down from the last id); [] when it has none."""
        if not hasattr(self, "_sentinel_ids"):
            ids = []
            while (i := self.piece_id(SENTINEL_PIECE.format(len(ids)))) is not None:
                ids.append(i)
            self._sentinel_ids = ids
        return list(self._sentinel_ids)

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


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model."""

    def __init__(self, model_proto: bytes, source: str):
        try:
            self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise TokenizerError(f"tokenizer {source} is not a SentencePiece model ({e})") from None
        self.files = {SENTENCEPIECE_FILE: model_proto}
        self.source = source
        self.eos_id = self.processor.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(f"tokenizer {source} defines no EOS piece; t2x ends every document with EOS")
        # Models without BOS (T5's, for one) start documents with EOS, as GPT-2 does.
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else self.eos_id
        self.mask_id = self.piece_id(MASK_PIECE)
        self._piece_bytes = self._bytes_per_piece()

    def piece_id(self, piece: str) -> int | None:
        i = self.processor.piece_to_id(piece)  # the unknown piece's id when there is none
        return i if self.processor.id_to_piece(i) == piece else None

    def _bytes_per_piece(self) -> np.ndarray:
        """A byte-fallback piece 1, control pieces 0, others their text with
        SentencePiece's word-boundary mark as a space."""
        sp = self.processor
        sizes = np.zeros(sp.get_piece_size(), np.int64)
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                sizes[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                sizes[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return sizes

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, out_type=int, num_threads=min(4, os.cpu_count() or 1))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def word_starts(self) -> np.ndarray:
        sp = self.processor
        return np.array([
            sp.id_to_piece(i).startswith("\u2581") or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
            or (not sp.is_byte(i) and self._piece_bytes[i] == 0)
            for i in range(sp.get_piece_size())
        ])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``), with its special tokens
    from ``tokenizer_config.json`` (``bos_token``, ``eos_token``, or a BERT's ``cls_token``,
    ``sep_token``; ``mask_token``) when given one."""

    def __init__(self, tokenizer_json: bytes, config_json: bytes | None, source: str):
        from tokenizers import Tokenizer as Backend

        try:
            self.backend = Backend.from_str(tokenizer_json.decode("utf-8"))
            spec = json.loads(tokenizer_json)
            config = json.loads(config_json) if config_json else {}
        except Exception as e:  # tokenizers raises a plain Exception for a malformed file
            raise TokenizerError(f"tokenizer {source} is not a Hugging Face tokenizer.json ({e})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"tokenizer {source}: {HF_CONFIG_FILE} is not a JSON object")
        self.files = {HF_FILE: tokenizer_json} | ({HF_CONFIG_FILE: config_json} if config_json else {})
        self.source = source
        self.special = self._special_ids(spec)
        # BERT's tokenizers name [CLS] and [SEP], which frame its rows as BOS and EOS do t2x's.
        self.eos_id = self._token_id(*self._named(config, "eos_token", "sep_token"))
        if self.eos_id is None:
            known = [t for t in _KNOWN_EOS if self.backend.token_to_id(t) is not None]
            if not known:
                raise TokenizerError(
                    f"tokenizer {source} names no end-of-sequence token: put a {HF_CONFIG_FILE} with eos_token beside it"
                )
            self.eos_id = self.backend.token_to_id(known[0])
        bos = self._token_id(*self._named(config, "bos_token", "cls_token"))
        self.bos_id = self.eos_id if bos is None else bos  # no BOS: documents start with EOS, as GPT-2's
        self.mask_id = self._token_id(config.get("mask_token"), "mask_token")
        if self.mask_id is None:
            self.mask_id = next((self.backend.token_to_id(t) for t in _KNOWN_MASK if self.backend.token_to_id(t) is not None), None)
        self._model_type = spec.get("model", {}).get("type")
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        self._piece_bytes = self._bytes_per_piece(spec)

    @staticmethod
    def _named(config: dict, key: str, fallback: str) -> tuple[object, str]:
        """The token ``config`` names under ``key``, else under ``fallback``, and which key."""
        return (config[key], key) if config.get(key) is not None else (config.get(fallback), fallback)

    def _token_id(self, token, key: str) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        if not isinstance(token, str) or self.backend.token_to_id(token) is None:
            raise TokenizerError(f"tokenizer {self.source}: {HF_CONFIG_FILE} {key} {token!r} is not in its vocabulary")
        return self.backend.token_to_id(token)

    @staticmethod
    def _special_ids(spec: dict) -> set[int]:
        return {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}

    def _bytes_per_piece(self, spec: dict) -> np.ndarray:
        """Byte-level pieces (GPT-2's) one byte per character; SentencePiece-style pieces
        their text with the word-boundary mark as a space, byte pieces 1; special 0."""
        byte_level = self._byte_level
        size = self.backend.get_vocab_size(with_added_tokens=True)
        sizes = np.zeros(size, np.int64)
        for i in range(size):
            piece = self.backend.id_to_token(i)
            if piece is None or i in self.special:
                continue
            if byte_level:
                sizes[i] = len(piece)
            elif _BYTE_PIECE.fullmatch(piece):
                sizes[i] = 1
            else:
                sizes[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return sizes

    def piece_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def word_starts(self) -> np.ndarray:
        pieces = [self.backend.id_to_token(i) or "" for i in range(self.vocab_size)]
        if self._model_type == "WordPiece":  # BERT's: continuations start with ##
            starts = [not p.startswith("##") for p in pieces]
        elif self._byte_level:  # GPT-2's: a word starts with its space, Ġ
            starts = [p.startswith("\u0120") for p in pieces]
        else:  # SentencePiece-style
            starts = [p.startswith("\u2581") for p in pieces]
        return np.array(starts) | (self._piece_bytes == 0)


def from_files(files: dict[str, bytes], source: str) -> Tokenizer:
    """The tokenizer ``files`` make (a SentencePiece model, or a tokenizer.json and
    optionally its tokenizer_config.json)."""
    if SENTENCEPIECE_FILE in files:
        return SentencePieceTokenizer(files[SENTENCEPIECE_FILE], source)
    if HF_FILE in files:
        return HFTokenizer(files[HF_FILE], files.get(HF_CONFIG_FILE), source)
    raise TokenizerError(f"{source} holds no tokenizer: neither {SENTENCEPIECE_FILE} nor {HF_FILE}")


def read_files(directory: str, gfile=None) -> dict[str, bytes]:
    """The tokenizer files present in ``directory`` (local unless ``gfile`` is given)."""
    exists = gfile.exists if gfile else os.path.isfile
    opener = gfile.GFile if gfile else open
    files = {}
    for name in FILES:
        path = os.path.join(directory, name)
        if exists(path):
            with opener(path, "rb") as f:
                files[name] = f.read()
    if SENTENCEPIECE_FILE in files:  # a directory with both is read as its SentencePiece model
        files = {SENTENCEPIECE_FILE: files[SENTENCEPIECE_FILE]}
    return files


def pack(files: dict[str, bytes]) -> bytes:
    """Tokenizer files as one byte string (to send to other processes); ``unpack`` reverses it."""
    return json.dumps({k: base64.b64encode(v).decode() for k, v in files.items()}).encode()


def unpack(data: bytes) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in json.loads(data).items()}


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

    prefix = corpus.cache_dir() / "tokenizers" / f"{corpus.corpus_dir().name}-unigram-{vocab_size}-t{TRAINING_THREADS}"
    path = f"{prefix}.model"
    if not os.path.exists(path):
        from t2x.data.sources import read_texts  # tf.data: only to train it

        try:
            train_tokenizer(read_texts([corpus.split_file("train")]), vocab_size, str(prefix))
        except TokenizerError as e:
            raise TokenizerError(
                f"data.tokenizer=builtin:{vocab_size}: the built-in corpus cannot give that many pieces ({e}). "
                "Give data.tokenizer a smaller builtin:N (builtin:4096, say) or the path of a tokenizer trained "
                "on your data (`t2x tokenizer train`)") from None
    return path


def resolve_tokenizer(spec: str) -> str:
    """The file or directory a tokenizer spec names (training the built-in one if needed)."""
    if spec.startswith("builtin:"):
        size = spec.split(":", 1)[1]
        if not size.isdigit():
            raise TokenizerError(f"data.tokenizer {spec!r}: builtin:N needs a number of pieces N")
        return builtin_tokenizer_path(int(size))
    if not _gfile().exists(spec):
        raise TokenizerError(
            f"data.tokenizer: no tokenizer at {spec!r}; give a SentencePiece .model, a Hugging Face "
            "tokenizer.json or a directory holding one, train one with `t2x tokenizer train`, or use builtin:N"
        )
    return spec


def load_tokenizer(spec: str) -> Tokenizer:
    """Load the tokenizer a spec names (see the module docstring)."""
    path = resolve_tokenizer(spec)
    gfile = _gfile()
    if gfile.isdir(path):
        files = read_files(path, gfile)
        if not files:
            raise TokenizerError(f"data.tokenizer: {path} holds neither {SENTENCEPIECE_FILE} nor {HF_FILE}")
        return from_files(files, path)
    with gfile.GFile(path, "rb") as f:
        data = f.read()
    if path.endswith(".json"):
        config = os.path.join(os.path.dirname(path), HF_CONFIG_FILE)
        config_json = None
        if gfile.exists(config):
            with gfile.GFile(config, "rb") as f:
                config_json = f.read()
        return HFTokenizer(data, config_json, path)
    return SentencePieceTokenizer(data, path)
