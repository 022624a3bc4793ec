"""A t2x tokenizer as the ``tokenizer.json`` and ``tokenizer_config.json`` that
``transformers.AutoTokenizer`` reads: SentencePiece models converted, ``tokenizer.json``
ones kept; sequences framed as the family's rows are (a decoder's BOS text, an
encoder's BOS text EOS), and an encoder's mask token included.
"""

from __future__ import annotations

import json

from t2x.config import ModelConfig
from t2x.data.tokenizer import HF_CONFIG_FILE, HF_FILE, SENTENCEPIECE_FILE, Tokenizer
from t2x.export import ExportError

MASK_TOKEN = "<mask>"  # the added token at an encoder's reserved mask id


def sentencepiece_to_hf(proto: bytes) -> bytes:
    """A ``tokenizer.json`` that tokenizes as the SentencePiece unigram model ``proto``.

    The pieces and scores become a ``tokenizers`` Unigram model with byte fallback;
    SentencePiece's dummy prefix and whitespace mark become a normalizer; user-defined
    pieces (t2x's "\\n") keep the score SentencePiece gives them, which always wins.
    Segmentations of equal score may still be broken differently (SentencePiece sums
    scores in float32, ``tokenizers`` in float64): a run of repeated punctuation can split
    as "**" + "***" in one and "***" + "**" in the other, the same text either way.

    Raises:
      ExportError: a model the conversion cannot reproduce (BPE, or a normalizer other
        than identity); the message names data.tokenizer.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    spec, norm = model.trainer_spec, model.normalizer_spec
    if spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ExportError(
            "--format hf: data.tokenizer is not a unigram SentencePiece model; t2x converts unigram models only"
        )
    if norm.name not in ("identity", "") and norm.precompiled_charsmap:
        raise ExportError(
            f"--format hf: data.tokenizer normalizes text ({norm.name}); "
            "t2x converts SentencePiece models with identity normalization only"
        )
    if norm.remove_extra_whitespaces or spec.treat_whitespace_as_suffix:
        raise ExportError(
            "--format hf: data.tokenizer removes extra whitespace or marks words at their end; "
            "t2x converts models that keep whitespace as it is"
        )
    piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    best = max((p.score for p in model.pieces if p.type == piece.NORMAL), default=0.0)
    vocab = []
    for p in model.pieces:
        score = p.score
        if p.type in (piece.CONTROL, piece.UNUSED, piece.UNKNOWN):
            score = -1e9  # never chosen by the segmentation
        elif p.type == piece.USER_DEFINED:
            score = len(p.piece) * best - 0.1  # SentencePiece's score for them
        vocab.append((p.piece, score))
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback))
    steps = [normalizers.Prepend("\u2581")] if norm.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(content=" ", left=1, right=0)] if norm.add_dummy_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    tokenizer.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in model.pieces
            if p.type in (piece.CONTROL, piece.UNKNOWN)
        ]
    )
    if spec.bos_id >= 0:  # encoding for the model starts with BOS, as t2x's sequences do
        bos = model.pieces[spec.bos_id].piece
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, spec.bos_id)]
        )
    return tokenizer.to_str().encode()


def _as_encoder(tokenizer_json: bytes, tokenizer: Tokenizer, token_types: int) -> tuple[bytes, int]:
    """``tokenizer_json`` framing sequences as encoder rows, ``BOS $A EOS`` (pairs
    ``BOS $A EOS $B EOS``, token types 0 then 1, or 0 throughout for a model with fewer
    than 2 types), with the mask token the encoder trained with: the tokenizer's own, or
    ``<mask>`` added at the first id past its vocabulary. Returns the file and the mask id."""
    from tokenizers import AddedToken, processors
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer_json.decode())
    mask = tokenizer.mask_id
    if mask is None:  # the id t2x.families.masking_tokens reserves
        mask = tokenizer.vocab_size
        backend.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
        if backend.token_to_id(MASK_TOKEN) != mask:
            raise ExportError(f"--format hf: {MASK_TOKEN} would be token {backend.token_to_id(MASK_TOKEN)} of "
                              f"tokenizer.json, but the encoder masks with id {mask}")
    bos, eos = backend.id_to_token(tokenizer.bos_id), backend.id_to_token(tokenizer.eos_id)
    b = 1 if token_types >= 2 else 0
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 $B:{b} {eos}:{b}",
        special_tokens=sorted({(bos, tokenizer.bos_id), (eos, tokenizer.eos_id)}),
    )
    return backend.to_str().encode(), mask


def tokenizer_files(
    files: dict[str, bytes], tokenizer: Tokenizer, encoder: ModelConfig | None = None
) -> tuple[dict[str, bytes], dict[str, int]]:
    """``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer``, and the ids
    of the special tokens the config names (``{"bos_token": 2, ...}``).

    Args:
      files: the t2x tokenizer's files (``tokenizer`` is what they make).
      tokenizer: the tokenizer.
      encoder: an encoder's model config: rows become ``BOS text EOS`` ([CLS] text [SEP])
        with token types, the config names cls, sep and mask tokens too, and sequences
        are at most ``max_seq_len`` long.

    Raises:
      ExportError: the tokenizer cannot be converted exactly.
    """
    from tokenizers import Tokenizer as Backend

    tokenizer_json = files.get(HF_FILE) or sentencepiece_to_hf(files[SENTENCEPIECE_FILE])
    config = json.loads(files[HF_CONFIG_FILE]) if HF_CONFIG_FILE in files else {}
    specials = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    if SENTENCEPIECE_FILE in files:
        specials |= {"unk_token": tokenizer.processor.unk_id(), "pad_token": tokenizer.processor.pad_id()}
    if encoder is not None:
        tokenizer_json, mask = _as_encoder(tokenizer_json, tokenizer, encoder.type_vocab_size)
        specials |= {"cls_token": tokenizer.bos_id, "sep_token": tokenizer.eos_id, "mask_token": mask}
        config.setdefault("model_max_length", encoder.max_seq_len)
        config.setdefault("model_input_names", ["input_ids", "token_type_ids", "attention_mask"])
    backend = Backend.from_str(tokenizer_json.decode())
    for key, i in specials.items():
        if i >= 0 and key not in config:
            config[key] = backend.id_to_token(i)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("model_max_length", 1 << 30)
    ids = {}
    for key, token in config.items():
        token = token.get("content") if isinstance(token, dict) else token
        if key.endswith("_token") and isinstance(token, str) and backend.token_to_id(token) is not None:
            ids[key] = backend.token_to_id(token)
    return {HF_FILE: tokenizer_json, HF_CONFIG_FILE: json.dumps(config, indent=2).encode()}, ids
