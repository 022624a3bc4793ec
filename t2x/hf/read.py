"""``t2x import-hf``: a local Hugging Face ``GPT2LMHeadModel``, ``LlamaForCausalLM``,
BERT or ``T5ForConditionalGeneration`` directory, or a ``BertForSequenceClassification``,
``GPT2ForSequenceClassification`` or ``LlamaForSequenceClassification`` one (safetensors
weights, ``tokenizer.json`` or SentencePiece ``tokenizer.model``), read as t2x
parameters, config and tokenizer (a classifier's as a fine-tuned t2x classifier's), and
written as a t2x export; what t2x cannot reproduce is refused by name.
"""

from __future__ import annotations

import json
import os

import numpy as np

from t2x.config import ConfigError, load_config
from t2x.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, TokenizerError, from_files
from t2x.export import Exported, ExportError, check_dtype, write_export
from t2x.hf import bert, classify, decoder, t5
from t2x.hf.format import float32_or_bfloat16, read_json, read_weights
from t2x.hf.tokenizer import seq2seq_import_files


def _architecture(hf: dict) -> str:
    """The class a ``config.json`` describes (its ``architectures``, else its ``model_type``)."""
    arch = (hf.get("architectures") or [None])[0] or {
        **decoder.MODEL_TYPES, "bert": bert.ENCODER, "t5": t5.ARCHITECTURE}.get(hf.get("model_type"))
    if arch not in (decoder.GPT2, decoder.LLAMA, *bert.ARCHITECTURES, t5.ARCHITECTURE, *classify.ARCHITECTURES):
        raise ExportError(f"config.json describes {arch or hf.get('model_type')!r}; t2x imports {decoder.GPT2}, "
                          f"{decoder.LLAMA}, BERT ({', '.join(bert.ARCHITECTURES)}) and {t5.ARCHITECTURE} models, "
                          f"and the classifiers {', '.join(classify.ARCHITECTURES)}")
    return arch


def read_hf(hf_dir: str, encoder_only: bool = False) -> Exported:
    """A local Hugging Face model directory as t2x parameters, config and tokenizer.

    Args:
      hf_dir: a ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``BertForMaskedLM``,
        ``BertForPreTraining``, ``BertModel`` or ``T5ForConditionalGeneration``
        directory. A T5's tokenizer gets the decoder's start token as its BOS (see
        ``t2x.hf.t5``). Or a ``BertForSequenceClassification``,
        ``GPT2ForSequenceClassification`` or ``LlamaForSequenceClassification``: a
        classifier, its ``classify.labels`` read from ``id2label`` (see
        ``t2x.hf.classify``).
      encoder_only: a BERT's encoder without its masked-LM head (what a fine-tuned
        classifier's backbone takes); the only way a ``BertModel`` reads.

    Returns:
      The export; its ``source`` names the architecture, and for BERT the tensors left
      out (``left_out``: the pooler and next-sentence head, which t2x does not read).

    Raises:
      ExportError: another architecture or an option t2x cannot reproduce (named), missing
        or misshapen tensors, tensors a plain model does not have, a BERT without its
        masked-LM head (unless ``encoder_only``), a classifier of another problem than
        single-label classification, or no tokenizer.
    """
    from t2x.data.tokenizer import read_files

    if not os.path.isdir(hf_dir):
        raise ExportError(f"{hf_dir} is not a directory")
    hf = read_json(os.path.join(hf_dir, "config.json"), "the model config")
    arch = _architecture(hf)
    is_classifier = arch in classify.ARCHITECTURES
    backbone = classify.BACKBONES.get(arch, arch)  # the class whose settings the model has
    is_bert, is_t5 = backbone in bert.ARCHITECTURES, arch == t5.ARCHITECTURE
    if encoder_only and arch not in bert.ARCHITECTURES:
        raise ExportError(f"encoder_only reads {', '.join(bert.ARCHITECTURES)} checkpoints; {hf_dir} is a {arch}")
    tensors = read_weights(hf_dir)  # BERT's and T5's settings depend on a tensor
    if is_bert:
        model = bert.model_settings(arch, hf, tensors)
    elif is_t5:
        model = t5.model_settings(hf, tensors)
    else:
        model = decoder.model_settings(backbone, hf)
    files = read_files(hf_dir)
    if HF_FILE in files:  # what AutoTokenizer reads first
        files = {k: v for k, v in files.items() if k != SENTENCEPIECE_FILE}
    if not files:
        raise ExportError(f"{hf_dir} has no tokenizer.json or tokenizer.model")
    if is_t5:
        files = seq2seq_import_files(files, t5.decoder_start(hf, hf_dir), hf_dir)
    try:
        tokenizer = from_files(files, hf_dir)
    except TokenizerError as e:
        raise ExportError(str(e)) from None
    context = model["max_seq_len"]
    try:
        cfg = load_config(
            None,
            [f"model.{k}={json.dumps(v)}" for k, v in model.items()]
            + [
                f"data.tokenizer={hf_dir}",
                f"data.seq_len={min(context, 1024)}",
                f"name={os.path.basename(os.path.abspath(hf_dir))}",
            ],
        )
    except ConfigError as e:
        raise ExportError(f"{hf_dir}/config.json: {e}") from None
    if is_classifier:
        cfg = classify.with_labels(cfg, arch, hf)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ExportError(
            f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
            f"{cfg.model.vocab_size}"
        )
    source = {"kind": "hf", "path": os.path.abspath(hf_dir), "architecture": arch}
    if is_classifier:
        params = classify.params(cfg, arch, tensors, hf_dir)
    elif is_bert:
        params, left_out = bert.params(cfg.model, arch, tensors, hf_dir, encoder_only)
        if left_out:
            source["left_out"] = left_out
    elif is_t5:
        params = t5.params(cfg.model, tensors, hf_dir)
    else:
        params = decoder.params(cfg.model, arch, tensors, hf_dir)
    return Exported(cfg, float32_or_bfloat16(params, hf_dir), files, source)


def import_hf(hf_dir: str, output: str, dtype: str | None = None) -> dict:
    """``t2x import-hf``: write a Hugging Face model directory as a t2x export; returns its
    manifest. ``dtype`` (float32 or bfloat16) defaults to the checkpoint's own."""
    if dtype is not None:
        check_dtype(dtype)
    exported = read_hf(hf_dir)
    if dtype is None:
        import jax
        import ml_dtypes

        stored = {x.dtype for x in jax.tree.leaves(exported.params)}
        dtype = "bfloat16" if stored == {np.dtype(ml_dtypes.bfloat16)} else "float32"
    return write_export(output, exported.cfg, exported.params, exported.tokenizer_files, exported.source, dtype)
