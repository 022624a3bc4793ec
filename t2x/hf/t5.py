"""Encoder-decoders as T5 (``T5ForConditionalGeneration``): which configs map, their
tensors both ways, and their ``config.json`` both ways.

T5 is a pre-norm encoder-decoder with RMSNorm, no biases, relative position biases (one
table per stack, held by its first block) and attention logits not scaled by
1/sqrt(head_dim): t2x's ``model.position=relative``. Its MLP is ``feed_forward_proj``:
``relu`` (T5 1.0) or ``gated-gelu`` (T5 1.1), t2x's ``relu`` and ``geglu``; ``gelu``,
``gelu_new`` and ``gated-silu`` are t2x's ``gelu_exact``, ``gelu`` and ``swiglu``.
Tied embeddings (T5 1.0) project the decoder's states scaled by d_model**-0.5 through
the shared embedding; an untied ``lm_head`` (T5 1.1) projects them unscaled.
Tensors are laid out as PyTorch's ``Linear``: weights [out, in].

The decoder's start token. t2x starts every target from the tokenizer's BOS
(``t2x.objectives.sequence_to_sequence``); T5 from ``decoder_start_token_id``, its pad
token (0) in Google's checkpoints. An export writes decoder_start_token_id = BOS. An
import makes the tokenizer's BOS the token at decoder_start_token_id (its
``tokenizer_config.json`` names that token as ``bos_token``: ``<pad>`` for Google's T5),
so t2x starts the decoder where T5 does; see ``t2x.hf.tokenizer.seq2seq_import_files``.
"""

from __future__ import annotations

import os

import numpy as np

from t2x.config import ModelConfig
from t2x.export import ExportError, layers, stacked
from t2x.hf.format import Tensors, read_json, refuse_export, refuse_import

ARCHITECTURE = "T5ForConditionalGeneration"
# t2x's model.mlp: T5's feed_forward_proj (transformers reads "gated-gelu" as gated gelu_new)
FEED_FORWARD = {"relu": "relu", "geglu": "gated-gelu", "gelu_exact": "gelu", "gelu": "gelu_new",
                "swiglu": "gated-silu"}
_MLP = {proj: mlp for mlp, proj in FEED_FORWARD.items()} | {"gated-gelu_new": "geglu"}
# A tensor some checkpoints carry that T5 never reads (cross-attention has no position bias).
_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def architecture(m: ModelConfig) -> str:
    """``T5ForConditionalGeneration``, when encoder-decoder ``m`` is a T5.

    Raises:
      ExportError: it is not; the message names the option.
    """
    why = "encoder-decoders export as T5ForConditionalGeneration, which has"
    if m.position != "relative":
        refuse_export(f"model.position={m.position}", f"{why} relative position biases (model.position=relative)")
    if m.norm_position != "pre":
        refuse_export(f"model.norm_position={m.norm_position}", f"{why} pre-norm blocks")
    if m.norm != "rmsnorm":
        refuse_export(f"model.norm={m.norm}", f"{why} RMSNorm (model.norm=rmsnorm)")
    if m.use_bias:
        refuse_export("model.use_bias=true", f"{why} no biases (model.use_bias=false)")
    if m.kv_heads != m.num_heads:
        refuse_export(f"model.num_kv_heads={m.num_kv_heads}", f"{why} as many key/value heads as query heads")
    return ARCHITECTURE


# ----------------------------------------------------------------------------- export


def tensors(m: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The ``T5ForConditionalGeneration`` state dict of encoder-decoder ``params``.

    The embedding is ``shared.weight`` alone (transformers ties both stacks' ``embed_tokens``
    to it, and saves it so); ``lm_head.weight`` only when untied.
    """
    d = m.d_model
    out = {"shared.weight": params["embed"]["embedding"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T

    def attention(pre: str, p: dict) -> None:
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{pre}.{theirs}.weight"] = p[ours]["kernel"].reshape(d, -1).T
        out[f"{pre}.o.weight"] = p["out"]["kernel"].reshape(-1, d).T

    for stack, num_layers in (("encoder", m.num_layers), ("decoder", m.decoder_layers)):
        tree = params[stack]
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = tree["relative_bias"]["embedding"]
        out[f"{stack}.final_layer_norm.weight"] = tree["final_norm"]["scale"]
        for i, p in enumerate(layers(tree, num_layers)):
            block = f"{stack}.block.{i}.layer"
            attention(f"{block}.0.SelfAttention", p["attn"])
            out[f"{block}.0.layer_norm.weight"] = p["attn_norm"]["scale"]
            ff = 1
            if stack == "decoder":
                attention(f"{block}.1.EncDecAttention", p["cross_attn"])
                out[f"{block}.1.layer_norm.weight"] = p["cross_norm"]["scale"]
                ff = 2
            mlp, pre = p["mlp"], f"{block}.{ff}.DenseReluDense"
            if "gate" in mlp:
                out[f"{pre}.wi_0.weight"] = mlp["gate"]["kernel"].T
                out[f"{pre}.wi_1.weight"] = mlp["up"]["kernel"].T
            else:
                out[f"{pre}.wi.weight"] = mlp["up"]["kernel"].T
            out[f"{pre}.wo.weight"] = mlp["down"]["kernel"].T
            out[f"{block}.{ff}.layer_norm.weight"] = p["mlp_norm"]["scale"]
    return out


def hf_config(m: ModelConfig, dtype: str, specials: dict[str, int]) -> dict:
    """``config.json`` of encoder-decoder ``m`` (``specials``: the ids of the tokenizer's
    special tokens, ``{"bos_token": 2, ...}``): the decoder starts from BOS, as t2x's."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "t5",
        "vocab_size": m.vocab_size,
        "d_model": m.d_model,
        "d_kv": m.head_size,
        "d_ff": m.d_ff,
        "num_layers": m.num_layers,
        "num_decoder_layers": m.decoder_layers,
        "num_heads": m.num_heads,
        "relative_attention_num_buckets": m.relative_buckets,
        "relative_attention_max_distance": m.relative_max_distance,
        "feed_forward_proj": FEED_FORWARD[m.mlp],
        "layer_norm_epsilon": m.norm_eps,
        "dropout_rate": m.dropout,
        "initializer_factor": 1.0,
        # transformers 4 reads both from tie_word_embeddings; 5 always ties an lm_head
        # the checkpoint does not hold, and scales as scale_decoder_outputs says.
        "tie_word_embeddings": m.tie_embeddings,
        "scale_decoder_outputs": m.tie_embeddings,
        "n_positions": m.max_seq_len,
        "is_encoder_decoder": True,
        "use_cache": True,
        "decoder_start_token_id": specials["bos_token"],
        "bos_token_id": specials["bos_token"],
        "eos_token_id": specials["eos_token"],
        "pad_token_id": specials.get("pad_token", specials["eos_token"]),
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def generation_config(config: dict) -> dict:
    """``generation_config.json`` of an exported ``config.json``."""
    return {k: config[k] for k in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id")}


# ----------------------------------------------------------------------------- import


def decoder_start(hf: dict, hf_dir: str) -> int:
    """The id T5 starts the decoder from: ``decoder_start_token_id`` of ``config.json``,
    else of ``generation_config.json``, else ``pad_token_id`` (T5's convention; what
    transformers' T5 itself falls back on to shift labels), else 0."""
    start = hf.get("decoder_start_token_id")
    generation = os.path.join(hf_dir, "generation_config.json")
    if start is None and os.path.isfile(generation):
        start = read_json(generation, "the generation config").get("decoder_start_token_id")
    if start is None:
        start = hf.get("pad_token_id")
    if start is not None and not isinstance(start, int):
        refuse_import(hf, "decoder_start_token_id", "t2x starts every target from one token")
    return 0 if start is None else start


def _scales_output(hf: dict) -> bool:
    """Whether T5 scales the decoder's states by d_model**-0.5 before the projection:
    ``scale_decoder_outputs`` (transformers 5), else ``tie_word_embeddings`` (4)."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def model_settings(hf: dict, tensors: dict[str, np.ndarray]) -> dict:
    """The t2x ``model.*`` settings of a T5 ``config.json`` ``hf`` (and its ``tensors``:
    whether ``lm_head.weight`` is the embedding's or its own).

    Raises:
      ExportError: an option t2x cannot reproduce, named.
    """
    if hf.get("model_type", "t5") != "t5":
        refuse_import(hf, "model_type", f"{ARCHITECTURE} is model_type t5")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _MLP:
        refuse_import(hf, "feed_forward_proj", f"t2x's T5 MLPs are {', '.join(FEED_FORWARD.values())}")
    if not hf.get("is_encoder_decoder", True) or hf.get("is_decoder", False):
        refuse_import(hf, "is_encoder_decoder", "t2x imports the whole encoder-decoder")
    head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    own_head = head is not None and not (shared is not None and np.array_equal(head, shared))
    scaled = _scales_output(hf)
    if scaled and own_head:
        refuse_import(hf, "scale_decoder_outputs" if "scale_decoder_outputs" in hf else "tie_word_embeddings",
                      "lm_head.weight is not the shared embedding, yet the decoder's states are scaled as a tied "
                      "projection's; t2x scales only a tied one (model.tie_embeddings=true)")
    d, heads = hf.get("d_model", 512), hf.get("num_heads", 8)
    d_kv = hf.get("d_kv", 64)
    return {
        "family": "encoder_decoder",
        "d_model": d,
        "num_layers": hf.get("num_layers", 6),
        "num_decoder_layers": hf.get("num_decoder_layers") or hf.get("num_layers", 6),
        "num_heads": heads,
        "head_dim": None if d_kv * heads == d else d_kv,
        "d_ff": hf.get("d_ff", 2048),
        "max_seq_len": hf.get("n_positions", 512),
        "vocab_size": hf.get("vocab_size", 32128),
        "position": "relative",
        "relative_buckets": hf.get("relative_attention_num_buckets", 32),
        "relative_max_distance": hf.get("relative_attention_max_distance", 128),
        "norm": "rmsnorm",
        "norm_eps": hf.get("layer_norm_epsilon", 1e-6),
        "norm_position": "pre",
        "mlp": _MLP[proj],
        "use_bias": False,
        "tie_embeddings": scaled,
    }


def params(m: ModelConfig, tensors: dict[str, np.ndarray], where: str) -> dict:
    """t2x encoder-decoder parameters of a T5 checkpoint's ``tensors``.

    The embedding is ``shared.weight`` (or, without it, a stack's ``embed_tokens``,
    which must then agree). Untied (``m.tie_embeddings`` false: the decoder's states
    unscaled), the projection is ``lm_head.weight``, or the embedding when the checkpoint
    holds none (transformers 5 ties it so).

    Raises:
      ExportError: a tensor is missing, misshapen, or not one a plain T5 has; stacks
        embedding differently.
    """
    w = Tensors(tensors, "", where)
    d, h, hd, f, v = m.d_model, m.num_heads, m.head_size, m.d_ff, m.vocab_size
    names = [n for n in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight") if n in w]
    if not names:
        raise ExportError(f"{where} has no tensor shared.weight")
    embeddings = [w.take(n, (v, d)) for n in names]
    for n, e in zip(names[1:], embeddings[1:]):
        if not np.array_equal(e, embeddings[0]):
            raise ExportError(f"{where}: {n} differs from {names[0]}; t2x's encoder and decoder share one embedding")
    out = {"embed": {"embedding": embeddings[0]}}
    head = w.take("lm_head.weight", (v, d)) if "lm_head.weight" in w else None
    if not m.tie_embeddings:
        out["lm_head"] = {"kernel": (embeddings[0] if head is None else head).T}
    w.drop(_UNUSED)

    def attention(pre: str) -> dict:
        p = {ours: {"kernel": w.take(f"{pre}.{theirs}.weight", (h * hd, d)).T.reshape(d, h, hd)}
             for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"))}
        p["out"] = {"kernel": w.take(f"{pre}.o.weight", (d, h * hd)).T.reshape(h, hd, d)}
        return p

    def scale(name: str) -> dict:
        return {"scale": w.take(name, (d,))}

    for stack, num_layers in (("encoder", m.num_layers), ("decoder", m.decoder_layers)):
        per_layer = []
        for i in range(num_layers):
            block = f"{stack}.block.{i}.layer"
            layer = {"attn": attention(f"{block}.0.SelfAttention"), "attn_norm": scale(f"{block}.0.layer_norm.weight")}
            ff = 1
            if stack == "decoder":
                layer |= {"cross_attn": attention(f"{block}.1.EncDecAttention"),
                          "cross_norm": scale(f"{block}.1.layer_norm.weight")}
                ff = 2
            pre = f"{block}.{ff}.DenseReluDense"
            if m.mlp in ("geglu", "swiglu"):
                mlp = {"gate": {"kernel": w.take(f"{pre}.wi_0.weight", (f, d)).T},
                       "up": {"kernel": w.take(f"{pre}.wi_1.weight", (f, d)).T}}
            else:
                mlp = {"up": {"kernel": w.take(f"{pre}.wi.weight", (f, d)).T}}
            mlp["down"] = {"kernel": w.take(f"{pre}.wo.weight", (d, f)).T}
            per_layer.append(layer | {"mlp": mlp, "mlp_norm": scale(f"{block}.{ff}.layer_norm.weight")})
        out[stack] = {
            "blocks": stacked(per_layer, m.scan_layers),
            "final_norm": scale(f"{stack}.final_layer_norm.weight"),
            "relative_bias": {"embedding": w.take(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (m.relative_buckets, h))},
        }
    w.done()
    return out
