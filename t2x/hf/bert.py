"""Encoders as BERT (``BertForMaskedLM``; ``BertForPreTraining`` with the next-sentence
head; ``BertForSequenceClassification`` for a classifier fine-tuned from one): which
configs map, their tensors both ways, and their ``config.json`` both ways.

BERT is a post-norm encoder with learned positions, token types, a normalized embedding
sum, LayerNorm and biases everywhere, and a GELU MLP (exact, ``gelu``, or the tanh
approximation, ``gelu_new``); its masked-LM head is a dense layer, GELU and LayerNorm,
then the vocabulary projection (tied to the token embedding, or not) plus a bias.
Tensors are laid out as PyTorch's ``Linear``: weights [out, in].
"""

from __future__ import annotations

import re

import numpy as np

from t2x.config import ModelConfig
from t2x.export import ExportError, layers, stacked
from t2x.hf.format import Tensors, refuse_export, refuse_import

MASKED_LM, PRETRAINING, ENCODER = "BertForMaskedLM", "BertForPreTraining", "BertModel"
ARCHITECTURES = (MASKED_LM, PRETRAINING, ENCODER)
SEQUENCE_CLASSIFICATION = "BertForSequenceClassification"  # a fine-tuned classifier pooling [CLS]
# Heads t2x reads no parameters of: BERT's pooler and next-sentence classifier.
_UNUSED = ("pooler.", "cls.seq_relationship.")
# hidden_act: t2x's model.mlp
_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def architecture(m: ModelConfig) -> str:
    """``BertForMaskedLM``, when encoder ``m`` is a BERT.

    Raises:
      ExportError: it is not; the message names the option.
    """
    why = "encoders export as BertForMaskedLM, which has"
    if m.norm_position != "post":
        refuse_export(f"model.norm_position={m.norm_position}", f"{why} post-norm blocks")
    if m.position != "learned":
        refuse_export(f"model.position={m.position}", f"{why} learned positions")
    if m.norm != "layernorm":
        refuse_export(f"model.norm={m.norm}", f"{why} LayerNorm")
    if m.mlp not in ("gelu", "gelu_exact"):
        refuse_export(f"model.mlp={m.mlp}", f"{why} a GELU MLP (model.mlp=gelu_exact or gelu)")
    if not m.use_bias:
        refuse_export("model.use_bias=false", f"{why} biases in every dense layer and norm")
    if not m.embed_norm:
        refuse_export("model.embed_norm=false", f"{why} a LayerNorm over the summed embeddings")
    if m.kv_heads != m.num_heads:
        refuse_export(f"model.num_kv_heads={m.num_kv_heads}", f"{why} as many key/value heads as query heads")
    if m.head_size * m.num_heads != m.d_model:
        refuse_export(f"model.head_dim={m.head_dim}", f"{why} head_dim = d_model / num_heads")
    return MASKED_LM


def exported_class(params: dict) -> str:
    """``BertForPreTraining`` for parameters with the next-sentence head (a run trained
    with ``objective.next_sentence``), else ``BertForMaskedLM``."""
    return PRETRAINING if "pooler" in params else MASKED_LM


# ----------------------------------------------------------------------------- export


def _dense(pre: str, p: dict, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A t2x dense layer as a ``Linear`` (``shape``: its kernel as [in, out])."""
    return {pre + "weight": p["kernel"].reshape(shape).T, pre + "bias": p["bias"].reshape(-1)}


def _norm(pre: str, p: dict) -> dict[str, np.ndarray]:
    return {pre + "weight": p["scale"], pre + "bias": p["bias"]}


def tensors(m: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The checkpoint tensors of encoder ``params`` as BERT names and lays them out: the
    encoder's (``bert.*``), the masked-LM head's and, when trained, the next-sentence
    head's."""
    d = m.d_model
    out = _encoder_tensors(m, params)
    out |= {
        **_dense("cls.predictions.transform.dense.", params["mlm_dense"], (d, d)),
        **_norm("cls.predictions.transform.LayerNorm.", params["mlm_norm"]),
        "cls.predictions.bias": params["mlm_bias"],
    }
    # Tied, transformers 5 writes neither decoder tensor (it ties the weight to the word
    # embeddings and the bias to cls.predictions.bias); untied, it reads both.
    if not m.tie_embeddings:
        out["cls.predictions.decoder.weight"] = params["lm_head"]["kernel"].T
        out["cls.predictions.decoder.bias"] = params["mlm_bias"]
    if "pooler" in params:
        out |= _dense("bert.pooler.dense.", params["pooler"], (d, d))
        out |= _dense("cls.seq_relationship.", params["next_sentence"], (d, 2))
    return out


def classifier_tensors(m: ModelConfig, params: dict, num_labels: int) -> dict[str, np.ndarray]:
    """The ``BertForSequenceClassification`` tensors of a t2x classifier's ``params``
    (``cls`` pooling): its backbone as BERT's encoder, its pooler as BERT's, its dense
    layer as ``classifier``."""
    d = m.d_model
    return {
        **_encoder_tensors(m, params["backbone"]),
        **_dense("bert.pooler.dense.", params["pooler"], (d, d)),
        **_dense("classifier.", params["classifier"], (d, num_labels)),
    }


def _encoder_tensors(m: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The ``bert.*`` tensors: embeddings and layers.

    A model without token types gets a one-row table of zeros (BERT needs at least one
    type): its only valid id, 0, then adds nothing, as t2x adds nothing.
    """
    d, f = m.d_model, m.d_ff
    embed = params["embed"]["embedding"]
    types = params["type_embed"]["embedding"] if m.type_vocab_size else np.zeros((1, d), embed.dtype)
    out = {
        "bert.embeddings.word_embeddings.weight": embed,
        "bert.embeddings.position_embeddings.weight": params["pos_embed"]["embedding"],
        "bert.embeddings.token_type_embeddings.weight": types,
        **_norm("bert.embeddings.LayerNorm.", params["embed_norm"]),
    }
    for i, layer in enumerate(layers(params, m.num_layers)):
        a, mlp, pre = layer["attn"], layer["mlp"], f"bert.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            out |= _dense(f"{pre}attention.self.{n}.", a[n], (d, d))
        out |= {
            **_dense(pre + "attention.output.dense.", a["out"], (d, d)),
            **_norm(pre + "attention.output.LayerNorm.", layer["attn_norm"]),  # post-norm: after the residual
            **_dense(pre + "intermediate.dense.", mlp["up"], (d, f)),
            **_dense(pre + "output.dense.", mlp["down"], (f, d)),
            **_norm(pre + "output.LayerNorm.", layer["mlp_norm"]),
        }
    return out


def hf_config(m: ModelConfig, arch: str, dtype: str, specials: dict[str, int]) -> dict:
    """``config.json`` of encoder ``m`` as class ``arch`` (``specials``: the ids of the
    tokenizer's special tokens, ``{"bos_token": 2, ...}``)."""
    return {
        "architectures": [arch],
        "model_type": "bert",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "intermediate_size": m.d_ff,
        "hidden_act": "gelu" if m.mlp == "gelu_exact" else "gelu_new",
        "max_position_embeddings": m.max_seq_len,
        "type_vocab_size": max(m.type_vocab_size, 1),
        "layer_norm_eps": m.norm_eps,
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": m.dropout,
        "attention_probs_dropout_prob": m.dropout,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "pad_token_id": specials.get("pad_token"),
        "bos_token_id": specials["bos_token"],
        "eos_token_id": specials["eos_token"],
        "is_decoder": False,
        "add_cross_attention": False,
        "use_cache": False,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


# ----------------------------------------------------------------------------- import


def model_settings(arch: str, hf: dict, tensors: dict[str, np.ndarray]) -> dict:
    """The t2x ``model.*`` settings of a BERT ``config.json`` ``hf`` (and its ``tensors``:
    a one-row token-type table of zeros, what t2x writes for a model without token types,
    reads back as none).

    Raises:
      ExportError: an option t2x cannot reproduce, named.
    """
    if hf.get("model_type", "bert") != "bert":
        refuse_import(hf, "model_type", f"{arch} is model_type bert")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        refuse_import(hf, "hidden_act", "t2x's GELU is exact (gelu) or the tanh approximation (gelu_new)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        refuse_import(hf, "position_embedding_type", "t2x's encoder has absolute learned positions")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key, False):
            refuse_import(hf, key, "t2x's encoder is bidirectional and attends only to itself")
    d, types = hf.get("hidden_size", 768), hf.get("type_vocab_size", 2)
    table = next((v for k, v in tensors.items() if k.endswith("embeddings.token_type_embeddings.weight")), None)
    if types == 1 and table is not None and not np.any(table):
        types = 0
    return {
        "family": "encoder",
        "d_model": d,
        "num_layers": hf.get("num_hidden_layers", 12),
        "num_heads": hf.get("num_attention_heads", 12),
        "d_ff": hf.get("intermediate_size", 3072),
        "max_seq_len": hf.get("max_position_embeddings", 512),
        "vocab_size": hf.get("vocab_size", 30522),
        "type_vocab_size": types,
        "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "position": "learned",
        "norm": "layernorm",
        "norm_position": "post",
        "embed_norm": True,
        "mlp": _ACTIVATIONS[act],
        "use_bias": True,
        "tie_embeddings": hf.get("tie_word_embeddings", True),
        "init_std": hf.get("initializer_range", 0.02),
    }


def params(m: ModelConfig, arch: str, tensors: dict[str, np.ndarray], where: str,
           encoder_only: bool = False) -> tuple[dict, list[str]]:
    """t2x encoder parameters of a BERT checkpoint's ``tensors``, and the names of the
    tensors left out (the pooler and next-sentence head, which t2x's masked LM has not).

    Args:
      m: the model config (from ``model_settings``).
      arch: the checkpoint's class (a ``BertModel`` has no masked-LM head).
      tensors: the checkpoint's tensors.
      where: names the checkpoint in errors.
      encoder_only: leave the masked-LM head out (the parameters a fine-tuned
        classifier's backbone takes); a checkpoint without the head reads only so.

    Raises:
      ExportError: the masked-LM head is missing (and wanted), or a tensor is missing,
        misshapen, or not one a plain model has.
    """
    # Checkpoints converted from TensorFlow name LayerNorm's parameters gamma and beta.
    renamed = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
               for k, v in tensors.items()}
    w = Tensors(renamed, "bert.", where)
    has_head = any(k.startswith("cls.predictions.") for k in w.tensors)  # BertModel has none
    if not encoder_only and not has_head:
        raise ExportError(
            f"{where} is a {arch} without the masked-LM head (no cls.predictions.* tensors); t2x imports BERT "
            f"with it ({MASKED_LM}, {PRETRAINING}); t2x.hf.read_hf(..., encoder_only=True) reads the encoder alone"
        )
    d, f, h, hd = m.d_model, m.d_ff, m.num_heads, m.head_size

    def dense(pre: str, shape: tuple[int, int], kernel: tuple[int, ...], bias: tuple[int, ...]) -> dict:
        return {"kernel": w.take(pre + "weight", shape[::-1]).T.reshape(kernel),
                "bias": w.take(pre + "bias", shape[1:]).reshape(bias)}

    def norm(pre: str) -> dict:
        return {"scale": w.take(pre + "weight", (d,)), "bias": w.take(pre + "bias", (d,))}

    per_layer = []
    for i in range(m.num_layers):
        pre = f"encoder.layer.{i}."
        attn = {n: dense(f"{pre}attention.self.{n}.", (d, d), (d, h, hd), (h, hd)) for n in ("query", "key", "value")}
        attn["out"] = dense(pre + "attention.output.dense.", (d, d), (h, hd, d), (d,))
        per_layer.append({
            "attn": attn,
            "attn_norm": norm(pre + "attention.output.LayerNorm."),
            "mlp": {"up": dense(pre + "intermediate.dense.", (d, f), (d, f), (f,)),
                    "down": dense(pre + "output.dense.", (f, d), (f, d), (d,))},
            "mlp_norm": norm(pre + "output.LayerNorm."),
        })
    out = {
        "embed": {"embedding": w.take("embeddings.word_embeddings.weight", (m.vocab_size, d))},
        "pos_embed": {"embedding": w.take("embeddings.position_embeddings.weight", (m.max_seq_len, d))},
        "embed_norm": norm("embeddings.LayerNorm."),
        "blocks": stacked(per_layer, m.scan_layers),
    }
    types = w.take("embeddings.token_type_embeddings.weight", (max(m.type_vocab_size, 1), d))
    if m.type_vocab_size:
        out["type_embed"] = {"embedding": types}
    if not encoder_only:
        out |= _head(m, w)
    left_out = w.drop(_UNUSED + (("cls.predictions.",) if encoder_only else ()))
    w.done()
    return out, left_out


def classifier_params(m: ModelConfig, tensors: dict[str, np.ndarray], where: str, num_labels: int) -> dict:
    """A ``BertForSequenceClassification`` checkpoint's ``tensors`` as the parameters of
    a t2x classifier pooling ``cls``: the encoder as its backbone, BERT's pooler and
    ``classifier`` as its pooler and dense layer.

    Raises:
      ExportError: a tensor is missing, misshapen, or not one the plain class has.
    """
    w, d = Tensors(tensors, "", where), m.d_model
    head = {
        "pooler": {"kernel": w.take("bert.pooler.dense.weight", (d, d)).T,
                   "bias": w.take("bert.pooler.dense.bias", (d,))},
        "classifier": {"kernel": w.take("classifier.weight", (num_labels, d)).T,
                       "bias": w.take("classifier.bias", (num_labels,))},
    }
    backbone, _ = params(m, SEQUENCE_CLASSIFICATION, w.tensors, where, encoder_only=True)
    return {"backbone": backbone, **head}


def _head(m: ModelConfig, w: Tensors) -> dict:
    """The masked-LM head: transform, then the vocabulary projection and its bias (the
    one transformers uses: ``cls.predictions.bias`` tied, the decoder's own untied)."""
    d, v = m.d_model, m.vocab_size
    head = {
        "mlm_dense": {"kernel": w.take("cls.predictions.transform.dense.weight", (d, d)).T,
                      "bias": w.take("cls.predictions.transform.dense.bias", (d,))},
        "mlm_norm": {"scale": w.take("cls.predictions.transform.LayerNorm.weight", (d,)),
                     "bias": w.take("cls.predictions.transform.LayerNorm.bias", (d,))},
    }
    biases = ["cls.predictions.bias", "cls.predictions.decoder.bias"]
    if not m.tie_embeddings:
        biases.reverse()
        head["lm_head"] = {"kernel": w.take("cls.predictions.decoder.weight", (v, d)).T}
    else:
        w.drop(("cls.predictions.decoder.weight",))  # transformers replaces it with the word embeddings
    present = [b for b in biases if b in w]
    if not present:
        raise ExportError(f"{w.where} has no tensor cls.predictions.bias")
    head["mlm_bias"] = w.take(present[0], (v,))
    if len(present) > 1:
        w.take(present[1], (v,))  # transformers ties or ignores it
    return head
