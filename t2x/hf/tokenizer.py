"""A t2x tokenizer as the ``tokenizer.json`` and ``tokenizer_config.json`` that
``transformers.AutoTokenizer`` reads: SentencePiece models converted, ``tokenizer.json``
ones kept; sequences framed as the family's rows are (a decoder's BOS text, an
encoder's or a classifier's BOS text EOS, an encoder-decoder's text EOS), an encoder's
mask token, an encoder-decoder's sentinels and a decoder classifier's pad token
included. And back: an imported encoder-decoder's tokenizer made to read as t2x's.
"""

from __future__ import annotations

import json
import re

from t2x.config import ModelConfig
from t2x.data.tokenizer import HF_CONFIG_FILE, HF_FILE, SENTENCEPIECE_FILE, Tokenizer, TokenizerError, from_files
from t2x.export import ExportError

MASK_TOKEN = "<mask>"  # the added token at an encoder's reserved mask id
PAD_TOKEN = "<pad>"  # added past the vocabulary for a decoder classifier whose tokenizer has no pad token but EOS
SENTINEL = "<extra_id_{}>"  # an encoder-decoder's k-th sentinel, as T5 spells it
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


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
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer_json.decode())
    mask = tokenizer.mask_id
    if mask is None:  # the id t2x.families.masking_tokens reserves
        mask = tokenizer.vocab_size
        backend.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
        if backend.token_to_id(MASK_TOKEN) != mask:
            raise ExportError(f"--format hf: {MASK_TOKEN} would be token {backend.token_to_id(MASK_TOKEN)} of "
                              f"tokenizer.json, but the encoder masks with id {mask}")
    _frame_bos_text_eos(backend, tokenizer, token_types)
    return backend.to_str().encode(), mask


def _frame_bos_text_eos(backend, tokenizer: Tokenizer, token_types: int) -> None:
    """Make ``backend`` (a ``tokenizers.Tokenizer``) frame sequences as ``BOS $A EOS``
    (pairs ``BOS $A EOS $B EOS``, token types 0 then 1, or 0 throughout for a model with
    fewer than 2 types): an encoder's rows, and a classifier's."""
    from tokenizers import processors

    bos, eos = backend.id_to_token(tokenizer.bos_id), backend.id_to_token(tokenizer.eos_id)
    b = 1 if token_types >= 2 else 0
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 $B:{b} {eos}:{b}",
        special_tokens=sorted({(bos, tokenizer.bos_id), (eos, tokenizer.eos_id)}),
    )


def _as_decoder_classifier(tokenizer_json: bytes, tokenizer: Tokenizer, pad: int | None,
                           vocab_size: int) -> tuple[bytes, int]:
    """``tokenizer_json`` framing sequences as a classifier's rows, ``BOS $A EOS``, with a
    pad token other than EOS (transformers' decoder classifiers pool a row's last token
    that is not ``pad_token_id``, and t2x's pool its EOS): ``pad`` (the tokenizer's own),
    else its BOS, else ``<pad>`` added at the first id past its vocabulary. Returns the
    file and the pad id.

    Raises:
      ExportError: each is EOS, and the model's ``vocab_size`` has no id past the
        tokenizer's to add ``<pad>`` at.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer_json.decode())
    _frame_bos_text_eos(backend, tokenizer, 0)
    eos = tokenizer.eos_id
    for candidate in (pad, tokenizer.bos_id):
        if candidate is not None and candidate >= 0 and candidate != eos:
            return backend.to_str().encode(), candidate
    backend.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
    added = backend.token_to_id(PAD_TOKEN)
    if added == eos or added >= vocab_size:
        raise ExportError(f"--format hf: data.tokenizer has no token to pad with but EOS (its BOS and any pad token "
                          f"are EOS), and model.vocab_size={vocab_size} leaves no id past its {tokenizer.vocab_size} "
                          f"tokens to add {PAD_TOKEN} at; transformers' decoder classifiers take a row's last token "
                          "that is not padding, which must be EOS, as t2x's")
    return backend.to_str().encode(), added


def _as_seq2seq(tokenizer_json: bytes, tokenizer: Tokenizer, sentinels: int) -> tuple[bytes, list[str]]:
    """``tokenizer_json`` framing sequences as encoder-decoder rows, ``$A EOS`` (pairs
    ``$A EOS $B EOS``, as T5's), with ``sentinels`` sentinel tokens ``<extra_id_k>``
    added at the ids t2x's span corruption gives them: k past the tokenizer's vocabulary.
    A tokenizer that has ``<extra_id_k>`` tokens of its own (an imported T5's) keeps them
    and gets none added. Returns the file and the tokens added."""
    from tokenizers import AddedToken, processors
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer_json.decode())
    own = backend.token_to_id(SENTINEL.format(0)) is not None
    names = [] if own else [SENTINEL.format(k) for k in range(sentinels)]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    for k, name in enumerate(names):
        if backend.token_to_id(name) != tokenizer.vocab_size + k:
            raise ExportError(f"--format hf: {name} would be token {backend.token_to_id(name)} of tokenizer.json, "
                              f"but span corruption used id {tokenizer.vocab_size + k} for sentinel {k}")
    eos = backend.id_to_token(tokenizer.eos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:0 {eos}:0", special_tokens=[(eos, tokenizer.eos_id)])
    return backend.to_str().encode(), names


def tokenizer_files(
    files: dict[str, bytes], tokenizer: Tokenizer, model: ModelConfig | None = None, sentinels: int = 0,
    classifier: bool = False,
) -> tuple[dict[str, bytes], dict[str, int]]:
    """``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer``, and the ids
    of the special tokens the config names (``{"bos_token": 2, ...}``).

    Args:
      files: the t2x tokenizer's files (``tokenizer`` is what they make).
      tokenizer: the tokenizer.
      model: the model config. An encoder's rows become ``BOS text EOS`` ([CLS] text
        [SEP]) with token types, the config names cls, sep and mask tokens too, and
        sequences are at most ``max_seq_len`` long. An encoder-decoder's become
        ``text EOS`` (a decoder's stay ``BOS text``).
      sentinels: an encoder-decoder's span-corruption sentinels, added as the special
        tokens ``<extra_id_0>``, ``<extra_id_1>``, ... at the ids it trained them with.
      classifier: a fine-tuned classifier's; a decoder's rows then become ``BOS text
        EOS`` too, at most ``max_seq_len`` long, and its pad token one other than EOS
        (see ``_as_decoder_classifier``).

    Raises:
      ExportError: the tokenizer cannot be converted exactly.
    """
    from tokenizers import Tokenizer as Backend

    tokenizer_json = files.get(HF_FILE) or sentencepiece_to_hf(files[SENTENCEPIECE_FILE])
    config = json.loads(files[HF_CONFIG_FILE]) if HF_CONFIG_FILE in files else {}
    specials = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    if SENTENCEPIECE_FILE in files:
        specials |= {"unk_token": tokenizer.processor.unk_id(), "pad_token": tokenizer.processor.pad_id()}
    family = model.family if model is not None else "decoder"
    if family == "encoder":
        tokenizer_json, mask = _as_encoder(tokenizer_json, tokenizer, model.type_vocab_size)
        specials |= {"cls_token": tokenizer.bos_id, "sep_token": tokenizer.eos_id, "mask_token": mask}
        config.setdefault("model_max_length", model.max_seq_len)
        config.setdefault("model_input_names", ["input_ids", "token_type_ids", "attention_mask"])
    elif family == "encoder_decoder":
        tokenizer_json, added = _as_seq2seq(tokenizer_json, tokenizer, sentinels)
        if added:
            config["additional_special_tokens"] = added
    elif classifier:
        named = config.get("pad_token")
        named = named.get("content") if isinstance(named, dict) else named
        own = Backend.from_str(tokenizer_json.decode()).token_to_id(named) if isinstance(named, str) else None
        tokenizer_json, pad = _as_decoder_classifier(
            tokenizer_json, tokenizer, own if own is not None else specials.get("pad_token"), model.vocab_size)
        specials["pad_token"] = pad
        config.pop("pad_token", None)
        config.setdefault("model_max_length", model.max_seq_len)
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


def seq2seq_import_files(files: dict[str, bytes], start_id: int, where: str) -> dict[str, bytes]:
    """An imported encoder-decoder's tokenizer files, made to read as t2x's.

    Sentinels laid out as t2x's export writes them (``<extra_id_k>``, added tokens at
    the k-th id past the rest of the vocabulary) are taken out, so that t2x's span
    corruption and generation, which reserve the ids past the tokenizer's vocabulary,
    give ``<extra_id_k>`` the id it had. T5's own (added tokens too, but ``<extra_id_0>``
    the last id, counting down) stay in the vocabulary. And the BOS becomes the token at
    ``start_id``, the id the decoder starts from, since t2x starts it from BOS:
    ``tokenizer_config.json`` names that token as ``bos_token`` (T5's ``<pad>``).
    Files that need neither change are returned as they are.

    Raises:
      ExportError: no token has id ``start_id``, or a SentencePiece model's BOS is another.
    """
    try:
        tokenizer = from_files(files, where)
        if HF_FILE not in files:
            if tokenizer.bos_id != start_id:
                raise ExportError(f"{where}: config.json says the decoder starts from token {start_id} "
                                  f"(decoder_start_token_id), but the BOS of its {SENTENCEPIECE_FILE} is "
                                  f"{tokenizer.bos_id}; t2x starts it from BOS: give the directory a {HF_FILE}")
            return files
        config = json.loads(files[HF_CONFIG_FILE]) if HF_CONFIG_FILE in files else {}
        tokenizer_json = _without_t2x_sentinels(files[HF_FILE], config, tokenizer.vocab_size)
        if tokenizer.bos_id == start_id and tokenizer_json is None:
            return files
        if tokenizer.bos_id != start_id:
            token = tokenizer.backend.id_to_token(start_id)
            if token is None:
                raise ExportError(f"{where}: config.json decoder_start_token_id={start_id} is no token of {HF_FILE}")
            config["bos_token"] = token
        out = {HF_FILE: tokenizer_json or files[HF_FILE],
               HF_CONFIG_FILE: json.dumps(config, indent=2, ensure_ascii=False).encode()}
        if from_files(out, where).bos_id != start_id:
            raise ExportError(f"{where}: the decoder's start token {start_id} cannot be made the tokenizer's BOS")
    except TokenizerError as e:
        raise ExportError(str(e)) from None
    return out


def _without_t2x_sentinels(tokenizer_json: bytes, config: dict, vocab_size: int) -> bytes | None:
    """``tokenizer_json`` without the ``<extra_id_k>`` added tokens at ids
    ``vocab_size - sentinels + k`` (t2x's layout), and ``config`` (changed in place)
    without them among its special tokens; None when it has no such sentinels."""
    from tokenizers import Tokenizer as Backend

    spec = json.loads(tokenizer_json)
    added = spec.get("added_tokens", [])
    sentinels = {t["id"]: int(m.group(1)) for t in added if (m := _SENTINEL.fullmatch(t["content"]))}
    if not sentinels or any(i != vocab_size - len(sentinels) + k for i, k in sentinels.items()):
        return None
    stripped = json.dumps({**spec, "added_tokens": [t for t in added if t["id"] not in sentinels]},
                          ensure_ascii=False)
    if Backend.from_str(stripped).get_vocab_size(with_added_tokens=True) != vocab_size - len(sentinels):
        return None  # pieces of the model's own vocabulary too: they stay
    names = {SENTINEL.format(k) for k in sentinels.values()}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(config.get(key), list):
            config[key] = [t for t in config[key] if (t.get("content") if isinstance(t, dict) else t) not in names]
    if isinstance(config.get("added_tokens_decoder"), dict):
        config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items()
                                          if int(i) not in sentinels}
    return stripped.encode()
