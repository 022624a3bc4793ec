"""Decoders as ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (classifiers fine-tuned from
them as ``GPT2ForSequenceClassification`` or ``LlamaForSequenceClassification``): which
config maps to which, their tensors both ways, and their ``config.json`` both ways.

GPT-2-shaped configs (learned positions, LayerNorm, GELU, multi-head attention) map to
GPT-2; rotary positions, RMSNorm and SwiGLU (any number of key/value heads) to Llama.
Tensors are laid out as PyTorch's: ``Linear`` weights [out, in], GPT-2's ``Conv1D``
weights [in, out].
"""

from __future__ import annotations

import numpy as np

from t2x.config import ModelConfig
from t2x.export import ExportError, layers, stacked
from t2x.hf.format import Tensors, refuse_export, refuse_import

GPT2, LLAMA = "GPT2LMHeadModel", "LlamaForCausalLM"
MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA}
# A fine-tuned classifier pooling the last token, by the language model class of its backbone.
SEQUENCE_CLASSIFICATION = {GPT2: "GPT2ForSequenceClassification", LLAMA: "LlamaForSequenceClassification"}


def architecture(m: ModelConfig) -> str:
    """The class that represents decoder ``m`` exactly.

    Raises:
      ExportError: neither does; the message names the option.
    """
    if m.position == "learned":
        why = "learned positions export as GPT2LMHeadModel, which needs"
        if m.norm != "layernorm":
            refuse_export(f"model.norm={m.norm}", f"{why} model.norm=layernorm (rotary positions export as Llama)")
        if m.mlp != "gelu":
            refuse_export(f"model.mlp={m.mlp}", f"{why} model.mlp=gelu")
        if m.kv_heads != m.num_heads:
            refuse_export(f"model.num_kv_heads={m.num_kv_heads}", f"{why} as many key/value heads as query heads")
        if m.head_size * m.num_heads != m.d_model:
            refuse_export(f"model.head_dim={m.head_dim}", f"{why} head_dim = d_model / num_heads")
        return GPT2
    why = "rotary positions export as LlamaForCausalLM, which needs"
    if m.norm != "rmsnorm":
        refuse_export(f"model.norm={m.norm}", f"{why} model.norm=rmsnorm (learned positions export as GPT-2)")
    if m.mlp != "swiglu":
        refuse_export(f"model.mlp={m.mlp}", f"{why} model.mlp=swiglu")
    return LLAMA


# ----------------------------------------------------------------------------- export


def tensors(m: ModelConfig, arch: str, params: dict) -> dict[str, np.ndarray]:
    """The checkpoint tensors of ``params`` as class ``arch`` names and lays them out."""
    out = (_gpt2_tensors if arch == GPT2 else _llama_tensors)(m, params)
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out


def classifier_tensors(m: ModelConfig, arch: str, params: dict) -> dict[str, np.ndarray]:
    """The ``*ForSequenceClassification`` tensors of a t2x classifier's ``params``
    (``last`` pooling; ``arch``: its backbone's class): the backbone's, and its dense
    layer as ``score``.

    Raises:
      ExportError: the dense layer has a bias other than zero (``score`` has none; a
        classifier trained before decoder heads lost their bias).
    """
    head = params["classifier"]
    if np.any(np.asarray(head.get("bias", 0))):
        refuse_export("model.use_bias=true", f"the classifier's dense layer has a bias, and "
                      f"{SEQUENCE_CLASSIFICATION[arch]}'s score layer has none (fine-tune with model.use_bias=false)")
    body = (_gpt2_tensors if arch == GPT2 else _llama_tensors)(m, params["backbone"])
    return {**body, "score.weight": head["kernel"].T}


def _gpt2_tensors(m: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    d, zeros = m.d_model, lambda n: np.zeros(n, params["embed"]["embedding"].dtype)  # noqa: E731

    def bias(p: dict, n: int) -> np.ndarray:
        return np.asarray(p["bias"]).reshape(-1) if "bias" in p else zeros(n)

    out = {
        "transformer.wte.weight": params["embed"]["embedding"],
        "transformer.wpe.weight": params["pos_embed"]["embedding"],
    }
    for i, layer in enumerate(layers(params, m.num_layers)):
        a, mlp, pre = layer["attn"], layer["mlp"], f"transformer.h.{i}."
        out |= {
            pre + "ln_1.weight": layer["attn_norm"]["scale"],
            pre + "ln_1.bias": bias(layer["attn_norm"], d),
            # Conv1D weights are [in, out]: q, k and v side by side in c_attn.
            pre + "attn.c_attn.weight": np.concatenate(
                [a[n]["kernel"].reshape(d, d) for n in ("query", "key", "value")], 1
            ),
            pre + "attn.c_attn.bias": np.concatenate([bias(a[n], d) for n in ("query", "key", "value")]),
            pre + "attn.c_proj.weight": a["out"]["kernel"].reshape(d, d),
            pre + "attn.c_proj.bias": bias(a["out"], d),
            pre + "ln_2.weight": layer["mlp_norm"]["scale"],
            pre + "ln_2.bias": bias(layer["mlp_norm"], d),
            pre + "mlp.c_fc.weight": mlp["up"]["kernel"],
            pre + "mlp.c_fc.bias": bias(mlp["up"], m.d_ff),
            pre + "mlp.c_proj.weight": mlp["down"]["kernel"],
            pre + "mlp.c_proj.bias": bias(mlp["down"], d),
        }
    out |= {
        "transformer.ln_f.weight": params["final_norm"]["scale"],
        "transformer.ln_f.bias": bias(params["final_norm"], d),
    }
    return out


def _llama_tensors(m: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    d = m.d_model
    out = {"model.embed_tokens.weight": params["embed"]["embedding"]}
    for i, layer in enumerate(layers(params, m.num_layers)):
        a, mlp, pre = layer["attn"], layer["mlp"], f"model.layers.{i}."
        out |= {
            pre + "input_layernorm.weight": layer["attn_norm"]["scale"],
            pre + "post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
        }
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{pre}self_attn.{theirs}.weight"] = a[ours]["kernel"].reshape(d, -1).T  # Linear: [out, in]
            if m.use_bias:
                out[f"{pre}self_attn.{theirs}.bias"] = a[ours]["bias"].reshape(-1)
        out[pre + "self_attn.o_proj.weight"] = a["out"]["kernel"].reshape(-1, d).T
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            out[f"{pre}mlp.{theirs}.weight"] = mlp[ours]["kernel"].T
        if m.use_bias:
            out[pre + "self_attn.o_proj.bias"] = a["out"]["bias"]
            out |= {
                f"{pre}mlp.{t}.bias": mlp[o]["bias"]
                for o, t in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
            }
    out["model.norm.weight"] = params["final_norm"]["scale"]
    return out


def hf_config(m: ModelConfig, arch: str, dtype: str, specials: dict[str, int]) -> dict:
    """``config.json`` of decoder ``m`` as class ``arch`` (``specials``: the ids of the
    tokenizer's special tokens, ``{"bos_token": 2, ...}``)."""
    common = {
        "architectures": [arch],
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": specials["bos_token"],
        "eos_token_id": specials["eos_token"],
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch == GPT2:
        return {
            "model_type": "gpt2",
            **common,
            "n_embd": m.d_model,
            "n_layer": m.num_layers,
            "n_head": m.num_heads,
            "n_inner": m.d_ff,
            "n_positions": m.max_seq_len,
            "n_ctx": m.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": m.dropout,
            "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "initializer_range": m.init_std,
        }
    return {
        "model_type": "llama",
        **common,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size,
        "intermediate_size": m.d_ff,
        "max_position_embeddings": m.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": m.use_bias,
        "mlp_bias": m.use_bias,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "pretraining_tp": 1,
    }


# ----------------------------------------------------------------------------- import


def model_settings(arch: str, hf: dict) -> dict:
    """The t2x ``model.*`` settings of a GPT-2 or Llama ``config.json`` ``hf``.

    Raises:
      ExportError: an option t2x cannot reproduce, named.
    """
    if arch == GPT2:
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse_import(hf, "activation_function", "t2x's GELU is the tanh approximation (gelu_new)")
        for key, plain in (
            ("scale_attn_by_inverse_layer_idx", False),
            ("scale_attn_weights", True),
            ("add_cross_attention", False),
        ):
            if hf.get(key, plain) != plain:
                refuse_import(hf, key, "not a plain GPT-2 attention")
        d = hf.get("n_embd", 768)
        return {
            "d_model": d,
            "num_layers": hf.get("n_layer", 12),
            "num_heads": hf.get("n_head", 12),
            "d_ff": hf.get("n_inner") or 4 * d,
            "max_seq_len": hf.get("n_positions", 1024),
            "vocab_size": hf.get("vocab_size", 50257),
            "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "position": "learned",
            "norm": "layernorm",
            "mlp": "gelu",
            "use_bias": True,
            "tie_embeddings": hf.get("tie_word_embeddings", True),
            "init_std": hf.get("initializer_range", 0.02),
        }
    if hf.get("hidden_act", "silu") != "silu":
        refuse_import(hf, "hidden_act", "t2x's SwiGLU uses SiLU")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse_import(hf, "rope_parameters", "t2x implements unscaled rotary positions only")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        refuse_import(hf, "mlp_bias",
                      "t2x has biases in all projections or in none (attention_bias must equal mlp_bias)")
    d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    return {
        "d_model": d,
        "num_layers": hf.get("num_hidden_layers", 32),
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": None if hf.get("head_dim", d // heads) == d // heads else hf["head_dim"],
        "d_ff": hf.get("intermediate_size", 11008),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "vocab_size": hf.get("vocab_size", 32000),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "use_bias": bool(hf.get("attention_bias", False)),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "init_std": hf.get("initializer_range", 0.02),
    }


def params(m: ModelConfig, arch: str, tensors: dict[str, np.ndarray], where: str, lm_head: bool = True) -> dict:
    """t2x parameters of a GPT-2 or Llama checkpoint's ``tensors`` (with ``lm_head``
    false, those of the model without its LM head, which the checkpoint then lacks).

    Raises:
      ExportError: a tensor is missing, misshapen, or not one a plain model has.
    """
    tensors = dict(tensors)
    head = tensors.pop("lm_head.weight", None) if lm_head else None
    w = Tensors(tensors, "transformer." if arch == GPT2 else "model.", where)
    out = (_gpt2_params if arch == GPT2 else _llama_params)(m, w)
    w.done()
    if lm_head and not m.tie_embeddings:
        if head is None:
            raise ExportError(f"{where} has no lm_head.weight, and config.json says tie_word_embeddings=false")
        out["lm_head"] = {"kernel": head.T}
    return out


def _gpt2_params(m: ModelConfig, w: Tensors) -> dict:
    d, h, hd, f = m.d_model, m.num_heads, m.head_size, m.d_ff
    per_layer = []
    for i in range(m.num_layers):
        t = lambda name, *shape, i=i: w.take(f"h.{i}.{name}", shape)  # noqa: E731
        qkv, qkv_bias = t("attn.c_attn.weight", d, 3 * d), t("attn.c_attn.bias", 3 * d)
        attn = {
            n: {
                "kernel": qkv[:, j * d : (j + 1) * d].reshape(d, h, hd),
                "bias": qkv_bias[j * d : (j + 1) * d].reshape(h, hd),
            }
            for j, n in enumerate(("query", "key", "value"))
        }
        attn["out"] = {"kernel": t("attn.c_proj.weight", d, d).reshape(h, hd, d), "bias": t("attn.c_proj.bias", d)}
        per_layer.append(
            {
                "attn_norm": {"scale": t("ln_1.weight", d), "bias": t("ln_1.bias", d)},
                "attn": attn,
                "mlp_norm": {"scale": t("ln_2.weight", d), "bias": t("ln_2.bias", d)},
                "mlp": {
                    "up": {"kernel": t("mlp.c_fc.weight", d, f), "bias": t("mlp.c_fc.bias", f)},
                    "down": {"kernel": t("mlp.c_proj.weight", f, d), "bias": t("mlp.c_proj.bias", d)},
                },
            }
        )
    return {
        "embed": {"embedding": w.take("wte.weight", (m.vocab_size, d))},
        "pos_embed": {"embedding": w.take("wpe.weight", (m.max_seq_len, d))},
        "blocks": stacked(per_layer, m.scan_layers),
        "final_norm": {"scale": w.take("ln_f.weight", (d,)), "bias": w.take("ln_f.bias", (d,))},
    }


def _llama_params(m: ModelConfig, w: Tensors) -> dict:
    d, h, kv, hd, f = m.d_model, m.num_heads, m.kv_heads, m.head_size, m.d_ff
    per_layer = []
    for i in range(m.num_layers):
        t = lambda name, *shape, i=i: w.take(f"layers.{i}.{name}", shape)  # noqa: E731
        attn, mlp = {}, {}
        for ours, theirs, heads in (("query", "q_proj", h), ("key", "k_proj", kv), ("value", "v_proj", kv)):
            attn[ours] = {"kernel": t(f"self_attn.{theirs}.weight", heads * hd, d).T.reshape(d, heads, hd)}
            if m.use_bias:
                attn[ours]["bias"] = t(f"self_attn.{theirs}.bias", heads * hd).reshape(heads, hd)
        attn["out"] = {"kernel": t("self_attn.o_proj.weight", d, h * hd).T.reshape(h, hd, d)}
        for ours, theirs, shape in (
            ("gate", "gate_proj", (f, d)),
            ("up", "up_proj", (f, d)),
            ("down", "down_proj", (d, f)),
        ):
            mlp[ours] = {"kernel": t(f"mlp.{theirs}.weight", *shape).T}
            if m.use_bias:
                mlp[ours]["bias"] = t(f"mlp.{theirs}.bias", shape[0])
        if m.use_bias:
            attn["out"]["bias"] = t("self_attn.o_proj.bias", d)
        per_layer.append(
            {
                "attn_norm": {"scale": t("input_layernorm.weight", d)},
                "attn": attn,
                "mlp_norm": {"scale": t("post_attention_layernorm.weight", d)},
                "mlp": mlp,
            }
        )
    return {
        "embed": {"embedding": w.take("embed_tokens.weight", (m.vocab_size, d))},
        "blocks": stacked(per_layer, m.scan_layers),
        "final_norm": {"scale": w.take("norm.weight", (d,))},
    }


def classifier_params(m: ModelConfig, arch: str, tensors: dict[str, np.ndarray], where: str,
                      num_labels: int) -> dict:
    """A ``*ForSequenceClassification`` checkpoint's ``tensors`` (``arch``: the class of
    its backbone) as the parameters of a t2x classifier pooling ``last``: the backbone,
    and ``score`` as its dense layer (a decoder's head has no bias either).

    Raises:
      ExportError: a tensor is missing, misshapen, or not one the plain class has.
    """
    tensors = dict(tensors)
    score = tensors.pop("score.weight", None)
    if score is None:
        raise ExportError(f"{where} has no tensor score.weight")
    if score.shape != (num_labels, m.d_model):
        raise ExportError(f"{where}: score.weight has shape {score.shape}, not {(num_labels, m.d_model)} as "
                          "config.json implies")
    head = {"kernel": score.T}
    return {"backbone": params(m, arch, tensors, where, lm_head=False), "classifier": head}
