"""Hugging Face format: a decoder exported as ``GPT2LMHeadModel`` or ``LlamaForCausalLM``
with its tokenizer, and such a checkpoint imported as a t2x export.

The mapping is exact or refused: GPT-2-shaped configs (learned positions, LayerNorm,
GELU, multi-head attention) map to GPT-2; rotary positions, RMSNorm and SwiGLU (any
number of key/value heads) to Llama; any other combination is refused naming the option
that prevents it. Reading and writing need neither ``transformers`` nor ``torch``:
``config.json`` is written from the config, tensors are laid out as PyTorch's (``Linear``
weights [out, in], GPT-2's ``Conv1D`` weights [in, out]) with NumPy and stored with
safetensors. Only safetensors files are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from t2x.config import ConfigError, ModelConfig, load_config
from t2x.data.tokenizer import HF_CONFIG_FILE, HF_FILE, SENTENCEPIECE_FILE, Tokenizer, TokenizerError, from_files
from t2x.export import DTYPES, Exported, ExportError, cast, check_dtype, layers, stacked, staged_directory, write_export

GPT2, LLAMA = "GPT2LMHeadModel", "LlamaForCausalLM"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Buffers some checkpoints carry beside their parameters (GPT-2's causal mask, older
# Llamas' rotary frequencies): recomputed by both implementations, so never read.
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def architecture(m: ModelConfig) -> str:
    """The Hugging Face class that represents ``m`` exactly.

    Raises:
      ExportError: no supported class does; the message names the option.
    """

    def refuse(option: str, why: str):
        raise ExportError(f"--format hf: {option} cannot be exported exactly: {why}")

    if m.family != "decoder":
        refuse(f"model.family={m.family}", "only decoders export as GPT2LMHeadModel or LlamaForCausalLM")
    if m.position == "learned":
        why = "learned positions export as GPT2LMHeadModel, which needs"
        if m.norm != "layernorm":
            refuse(f"model.norm={m.norm}", f"{why} model.norm=layernorm (rotary positions export as Llama)")
        if m.mlp != "gelu":
            refuse(f"model.mlp={m.mlp}", f"{why} model.mlp=gelu")
        if m.kv_heads != m.num_heads:
            refuse(f"model.num_kv_heads={m.num_kv_heads}", f"{why} as many key/value heads as query heads")
        if m.head_size * m.num_heads != m.d_model:
            refuse(f"model.head_dim={m.head_dim}", f"{why} head_dim = d_model / num_heads")
        return GPT2
    why = "rotary positions export as LlamaForCausalLM, which needs"
    if m.norm != "rmsnorm":
        refuse(f"model.norm={m.norm}", f"{why} model.norm=rmsnorm (learned positions export as GPT-2)")
    if m.mlp != "swiglu":
        refuse(f"model.mlp={m.mlp}", f"{why} model.mlp=swiglu")
    return LLAMA


# ----------------------------------------------------------------------------- export


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
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
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
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out


def _hf_config(m: ModelConfig, arch: str, dtype: str, bos_id: int, eos_id: int) -> dict:
    common = {
        "architectures": [arch],
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
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


def _hf_tokenizer_files(files: dict[str, bytes], tokenizer: Tokenizer) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json for ``AutoTokenizer`` (``tokenizer`` is
    what ``files`` make)."""
    tokenizer_json = files.get(HF_FILE) or sentencepiece_to_hf(files[SENTENCEPIECE_FILE])
    config = json.loads(files[HF_CONFIG_FILE]) if HF_CONFIG_FILE in files else {}
    piece = _id_to_token(tokenizer_json)
    specials = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    if SENTENCEPIECE_FILE in files:
        specials |= {"unk_token": tokenizer.processor.unk_id(), "pad_token": tokenizer.processor.pad_id()}
    for key, i in specials.items():
        if i >= 0 and key not in config:
            config[key] = piece(i)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("model_max_length", 1 << 30)
    return {HF_FILE: tokenizer_json, HF_CONFIG_FILE: json.dumps(config, indent=2).encode()}


def _id_to_token(tokenizer_json: bytes):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json.decode()).id_to_token


def write_hf(output: str, exported: Exported, dtype: str = "float32") -> dict:
    """Write ``exported`` as a Hugging Face model directory (config.json,
    generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json);
    returns its config.json.

    Raises:
      ExportError: the model or tokenizer cannot be represented exactly (naming the
        option), or ``output`` is not empty or cannot be written.
    """
    from safetensors.numpy import save_file

    check_dtype(dtype)
    m = exported.cfg.model
    arch = architecture(m)
    try:
        tokenizer = from_files(exported.tokenizer_files, "export")
        tokenizer_files = _hf_tokenizer_files(exported.tokenizer_files, tokenizer)
    except TokenizerError as e:
        raise ExportError(f"--format hf: {e}") from None
    params = cast(exported.params, dtype)
    tensors = (_gpt2_tensors if arch == GPT2 else _llama_tensors)(m, params)
    tensors = {k: np.ascontiguousarray(v, DTYPES[dtype]) for k, v in tensors.items()}
    config = _hf_config(m, arch, dtype, tokenizer.bos_id, tokenizer.eos_id)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    with staged_directory(output) as staging:
        save_file(tensors, os.path.join(staging, WEIGHTS), metadata={"format": "pt"})
        for name, data in (("config.json", config), ("generation_config.json", generation)):
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
        for name, data in tokenizer_files.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
    return config


# ----------------------------------------------------------------------------- import


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ExportError(
            f"{os.path.dirname(path)} has no {os.path.basename(path)}: it is not a Hugging Face model directory"
        ) from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({what}): {e}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} is not a JSON object")
    return value


def _read_weights(hf_dir: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = os.path.join(hf_dir, WEIGHTS_INDEX)
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index, "the weights index").get("weight_map", {}).values()))
    elif os.path.isfile(os.path.join(hf_dir, WEIGHTS)):
        shards = [WEIGHTS]
    else:
        pickled = [f for f in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(hf_dir, f))]
        hint = (
            f" (it has {pickled[0]}: t2x reads no pickled weights; save them with safe_serialization)"
            if pickled
            else ""
        )
        raise ExportError(f"{hf_dir} has no {WEIGHTS} or {WEIGHTS_INDEX}{hint}")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        try:
            tensors |= load_file(os.path.join(hf_dir, shard))
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"{hf_dir}/{shard} is unreadable: {e}") from None
    return tensors


def _model_config(hf: dict) -> tuple[str, dict]:
    """The architecture and t2x ``model.*`` settings of a Hugging Face config.json."""
    arch = (hf.get("architectures") or [None])[0] or {"gpt2": GPT2, "llama": LLAMA}.get(hf.get("model_type"))

    def refuse(key: str, why: str):
        raise ExportError(f"config.json {key}={hf.get(key)!r}: {why}; t2x imports plain {GPT2} and {LLAMA} models")

    if arch == GPT2:
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse("activation_function", "t2x's GELU is the tanh approximation (gelu_new)")
        for key, plain in (
            ("scale_attn_by_inverse_layer_idx", False),
            ("scale_attn_weights", True),
            ("add_cross_attention", False),
        ):
            if hf.get(key, plain) != plain:
                refuse(key, "not a plain GPT-2 attention")
        d = hf.get("n_embd", 768)
        return arch, {
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
    if arch == LLAMA:
        if hf.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "t2x's SwiGLU uses SiLU")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            refuse("rope_parameters", "t2x implements unscaled rotary positions only")
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            refuse("mlp_bias", "t2x has biases in all projections or in none (attention_bias must equal mlp_bias)")
        d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
        return arch, {
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
    raise ExportError(f"config.json describes {arch or hf.get('model_type')!r}; t2x imports {GPT2} and {LLAMA} models")


class _Tensors:
    """Takes named tensors (their names with or without the model's prefix), once each,
    and names what is missing, misshapen or left over as the checkpoint names it."""

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str, where: str):
        self.names = {k.removeprefix(prefix): k for k in tensors if not k.endswith(_BUFFERS)}
        self.tensors = {short: tensors[k] for short, k in self.names.items()}
        self.prefix, self.where = prefix, where

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise ExportError(f"{self.where} has no tensor {self.prefix}{name}")
        value = self.tensors.pop(name)
        if value.shape != tuple(shape):
            raise ExportError(
                f"{self.where}: {self.names[name]} has shape {value.shape}, not {tuple(shape)} as config.json implies"
            )
        return value

    def done(self) -> None:
        if self.tensors:
            names = ", ".join(self.names[k] for k in sorted(self.tensors)[:5])
            raise ExportError(f"{self.where} has tensors a plain model does not: {names}")


def _gpt2_params(m: ModelConfig, w: _Tensors) -> dict:
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
    params = {
        "embed": {"embedding": w.take("wte.weight", (m.vocab_size, d))},
        "pos_embed": {"embedding": w.take("wpe.weight", (m.max_seq_len, d))},
        "blocks": stacked(per_layer, m.scan_layers),
        "final_norm": {"scale": w.take("ln_f.weight", (d,)), "bias": w.take("ln_f.bias", (d,))},
    }
    return params


def _llama_params(m: ModelConfig, w: _Tensors) -> dict:
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


def read_hf(hf_dir: str) -> Exported:
    """A local Hugging Face ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` directory
    (safetensors weights, ``tokenizer.json`` or SentencePiece ``tokenizer.model``) as t2x
    parameters, config and tokenizer.

    Raises:
      ExportError: another architecture or an option t2x cannot reproduce (named), missing
        or misshapen tensors, tensors a plain model does not have, or no tokenizer.
    """
    from t2x.data.tokenizer import read_files

    if not os.path.isdir(hf_dir):
        raise ExportError(f"{hf_dir} is not a directory")
    hf = _read_json(os.path.join(hf_dir, "config.json"), "the model config")
    arch, model = _model_config(hf)
    files = read_files(hf_dir)
    if HF_FILE in files:  # what AutoTokenizer reads first
        files = {k: v for k, v in files.items() if k != SENTENCEPIECE_FILE}
    if not files:
        raise ExportError(f"{hf_dir} has no tokenizer.json or tokenizer.model")
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
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ExportError(
            f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
            f"{cfg.model.vocab_size}"
        )
    tensors = _read_weights(hf_dir)
    prefix = "transformer." if arch == GPT2 else "model."
    head = tensors.pop("lm_head.weight", None)
    w = _Tensors(tensors, prefix, hf_dir)
    params = (_gpt2_params if arch == GPT2 else _llama_params)(cfg.model, w)
    w.done()
    m = cfg.model
    if not m.tie_embeddings:
        if head is None:
            raise ExportError(f"{hf_dir} has no lm_head.weight, and config.json says tie_word_embeddings=false")
        params["lm_head"] = {"kernel": head.T}
    params = _float32_or_bfloat16(params, hf_dir)
    return Exported(cfg, params, files, {"kind": "hf", "path": os.path.abspath(hf_dir), "architecture": arch})


def _float32_or_bfloat16(params: Any, where: str) -> Any:
    import jax
    import ml_dtypes

    def convert(x: np.ndarray) -> np.ndarray:
        if x.dtype in (np.float32, ml_dtypes.bfloat16):
            return np.ascontiguousarray(x)
        if x.dtype in (np.float16, np.float64):
            return np.ascontiguousarray(x, np.float32)
        raise ExportError(f"{where} holds {x.dtype} weights; t2x reads float32, bfloat16, float16 or float64")

    return jax.tree.map(convert, params)


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
