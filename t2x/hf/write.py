"""``t2x export --format hf``: a t2x model written as the Hugging Face class that
represents it exactly, with its tokenizer, or refused naming the option that prevents it.

Writing needs neither ``transformers`` nor ``torch``: ``config.json`` is written from the
config, and the tensors, laid out as PyTorch's, are stored with safetensors.
"""

from __future__ import annotations

import json
import os

import numpy as np

from t2x.config import ClassifyConfig, ModelConfig
from t2x.data.tokenizer import TokenizerError, from_files
from t2x.export import DTYPES, Exported, ExportError, cast, check_dtype, staged_directory
from t2x.families import family
from t2x.hf import bert, classify, decoder, t5
from t2x.hf.format import WEIGHTS
from t2x.hf.tokenizer import tokenizer_files


def architecture(m: ModelConfig, classifier: ClassifyConfig | None = None) -> str:
    """The Hugging Face class that represents ``m`` exactly: ``GPT2LMHeadModel`` or
    ``LlamaForCausalLM`` for a decoder, ``BertForMaskedLM`` for an encoder (written as
    ``BertForPreTraining`` when its parameters hold the next-sentence head),
    ``T5ForConditionalGeneration`` for an encoder-decoder; with ``classifier`` enabled
    (a fine-tuned classifier's ``classify``), the ``*ForSequenceClassification`` class
    (``t2x.hf.classify``).

    Raises:
      ExportError: no supported class does; the message names the option.
    """
    if classifier is not None and classifier.enabled:
        return classify.architecture(m, classifier)
    if m.family == "decoder":
        return decoder.architecture(m)
    if m.family == "encoder":
        return bert.architecture(m)
    return t5.architecture(m)


def write_hf(output: str, exported: Exported, dtype: str = "float32") -> dict:
    """Write ``exported`` as a Hugging Face model directory (config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json, and a decoder language
    model's or encoder-decoder's generation_config.json); returns its config.json.

    Raises:
      ExportError: the model or tokenizer cannot be represented exactly (naming the
        option), or ``output`` is not empty or cannot be written.
    """
    from safetensors.numpy import save_file

    check_dtype(dtype)
    cfg, m = exported.cfg, exported.cfg.model
    arch = architecture(m, cfg.classify)
    try:
        tokenizer = from_files(exported.tokenizer_files, "export")
        # an encoder-decoder's span-corruption sentinels past the tokenizer's vocabulary
        # (none when it has its own <extra_id_k>, which it keeps)
        seq2seq = m.family == "encoder_decoder" and not tokenizer.sentinel_ids()
        reserved = family(m.family).reserved_ids(cfg, tokenizer) if seq2seq else []
        sentinels = sum(i < m.vocab_size for i in reserved)
        files, specials = tokenizer_files(exported.tokenizer_files, tokenizer, m, sentinels, cfg.classify.enabled)
    except TokenizerError as e:
        raise ExportError(f"--format hf: {e}") from None
    params = cast(exported.params, dtype)
    if cfg.classify.enabled:
        tensors, config = classify.tensors(cfg, arch, params), classify.hf_config(cfg, arch, dtype, specials)
        json_files = {"config.json": config}
    elif m.family == "encoder":
        arch = bert.exported_class(params)
        tensors, config = bert.tensors(m, params), bert.hf_config(m, arch, dtype, specials)
        json_files = {"config.json": config}
    elif m.family == "encoder_decoder":
        tensors, config = t5.tensors(m, params), t5.hf_config(m, dtype, specials)
        json_files = {"config.json": config, "generation_config.json": t5.generation_config(config)}
    else:
        tensors, config = decoder.tensors(m, arch, params), decoder.hf_config(m, arch, dtype, specials)
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        json_files = {"config.json": config, "generation_config.json": generation}
    tensors = {k: np.ascontiguousarray(v, DTYPES[dtype]) for k, v in tensors.items()}
    with staged_directory(output) as staging:
        save_file(tensors, os.path.join(staging, WEIGHTS), metadata={"format": "pt"})
        for name, data in json_files.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
        for name, data in files.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
    return config
