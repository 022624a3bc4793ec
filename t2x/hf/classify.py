"""Fine-tuned classifiers (``t2x finetune``) as transformers' ``*ForSequenceClassification``,
and back: which classifiers map, and their labels and ``config.json``; the tensors are
mapped by each backbone's module (``bert``, ``decoder``).

An encoder's classifier pooling ``cls`` (BERT's pooler, dense and tanh, on the first
token) is ``BertForSequenceClassification``; a decoder's pooling ``last`` is
``GPT2ForSequenceClassification`` or ``LlamaForSequenceClassification``, as its
language model would be GPT-2 or Llama. No transformers class pools the mean, an
encoder's last token, or an encoder-decoder's encoder alone (``T5ForSequenceClassification``
runs the decoder too): those are refused naming ``classify.pooling``. The labels are
``id2label`` (``classify.labels`` in order), the problem single-label classification.

The last token. t2x pools each row's last real token: its EOS (a row is BOS text EOS,
then padding). transformers' decoder classifiers pool the rightmost token that is not
``pad_token_id``, so the export gives ``pad_token_id`` a token other than EOS (see
``t2x.hf.tokenizer.tokenizer_files``) and its tokenizer frames texts as BOS text EOS:
on right-padded rows both pool EOS.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from t2x.config import ClassifyConfig, Config, ConfigError, ModelConfig
from t2x.export import ExportError
from t2x.hf import bert, decoder
from t2x.hf.format import refuse_export, refuse_import

# Each class, and the class its backbone's settings read as.
BACKBONES = {bert.SEQUENCE_CLASSIFICATION: bert.MASKED_LM,
             **{cls: lm for lm, cls in decoder.SEQUENCE_CLASSIFICATION.items()}}
ARCHITECTURES = tuple(BACKBONES)
PROBLEM_TYPE = "single_label_classification"


def architecture(m: ModelConfig, c: ClassifyConfig) -> str:
    """The ``*ForSequenceClassification`` class of a classifier of model ``m`` and
    settings ``c``.

    Raises:
      ExportError: no class computes what it does; the message names the option.
    """
    from t2x.models.classifier import pooling_of

    pooling = pooling_of(m, c.pooling)
    if m.family == "encoder":
        bert.architecture(m)
        if pooling != "cls":
            refuse_export(f"classify.pooling={pooling}", f"an encoder's classifier exports as "
                          f"{bert.SEQUENCE_CLASSIFICATION}, which pools the first token ([CLS]) through BERT's "
                          "pooler (classify.pooling=cls)")
        return bert.SEQUENCE_CLASSIFICATION
    if m.family == "decoder":
        arch = decoder.SEQUENCE_CLASSIFICATION[decoder.architecture(m)]
        if pooling != "last":
            refuse_export(f"classify.pooling={pooling}",
                          f"a decoder's classifier exports as {arch}, which pools the last token (classify.pooling=last)")
        return arch
    refuse_export(f"classify.pooling={pooling}", "an encoder-decoder's classifier pools its encoder's states, which "
                  "no transformers class does (T5ForSequenceClassification reads the decoder's)")


def tensors(cfg: Config, arch: str, params: dict) -> dict[str, np.ndarray]:
    """The checkpoint tensors of the classifier's ``params`` as class ``arch`` names them.

    Raises:
      ExportError: a decoder's dense layer has a bias (``score`` has none).
    """
    if arch == bert.SEQUENCE_CLASSIFICATION:
        return bert.classifier_tensors(cfg.model, params, len(cfg.classify.labels))
    return decoder.classifier_tensors(cfg.model, BACKBONES[arch], params)


def hf_config(cfg: Config, arch: str, dtype: str, specials: dict[str, int]) -> dict:
    """``config.json`` of the classifier (``specials``: the ids of the tokenizer's special
    tokens, a decoder's ``pad_token`` other than EOS)."""
    m, labels = cfg.model, cfg.classify.labels
    if arch == bert.SEQUENCE_CLASSIFICATION:
        config = bert.hf_config(m, arch, dtype, specials)
    else:
        config = decoder.hf_config(m, BACKBONES[arch], dtype, specials)
        config |= {"architectures": [arch], "pad_token_id": specials["pad_token"], "use_cache": False}
    return config | {
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": PROBLEM_TYPE,
    }


def with_labels(cfg: Config, arch: str, hf: dict) -> Config:
    """``cfg`` (the backbone's settings, read from ``config.json`` ``hf``) as the
    classifier: ``classify.labels`` from ``id2label``, ``classify.pooling`` the class's.

    Raises:
      ExportError: not a single-label classification over two labels or more, or labels
        that are not ids 0..n-1 each with its own name.
    """
    if hf.get("problem_type") not in (None, PROBLEM_TYPE):
        refuse_import(hf, "problem_type", f"t2x's classifiers choose one label of several ({PROBLEM_TYPE})")
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    try:
        ids = sorted(int(k) for k in id2label)
    except (TypeError, ValueError):
        refuse_import(hf, "id2label", "its keys are not label ids")
    if ids != list(range(len(ids))):
        refuse_import(hf, "id2label", "label ids are not 0, 1, ..., n-1")
    labels = tuple(str(id2label.get(str(i), id2label.get(i))) for i in ids)
    if len(labels) < 2:
        refuse_import(hf, "id2label", "one output is a regression; t2x's classifiers choose one of two labels or more")
    pooling = "cls" if arch == bert.SEQUENCE_CLASSIFICATION else "last"
    try:
        return dataclasses.replace(cfg, classify=ClassifyConfig(labels=labels, pooling=pooling))
    except ConfigError as e:
        raise ExportError(f"config.json id2label: {e}") from None


def params(cfg: Config, arch: str, tensors: dict[str, np.ndarray], where: str) -> dict:
    """The t2x classifier parameters of a ``*ForSequenceClassification`` checkpoint's
    ``tensors``.

    Raises:
      ExportError: a tensor is missing, misshapen, or not one the plain class has.
    """
    num_labels = len(cfg.classify.labels)
    if arch == bert.SEQUENCE_CLASSIFICATION:
        return bert.classifier_params(cfg.model, tensors, where, num_labels)
    return decoder.classifier_params(cfg.model, BACKBONES[arch], tensors, where, num_labels)
