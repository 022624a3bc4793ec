"""An independent float64 NumPy implementation of the decoder, for checking t2x's model."""

from __future__ import annotations

import math

import numpy as np

from t2x.config import ModelConfig


def _layer_norm(x, p, eps, cfg):
    if cfg.norm == "rmsnorm":
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * p["scale"]
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps) * p["scale"]
    return out + p["bias"] if "bias" in p else out


def _dense(x, p, spec):
    out = np.einsum(spec, x, p["kernel"])
    return out + p["bias"] if "bias" in p else out


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _rope(x, positions, theta):
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (np.arange(0, 2 * half, 2) / (2 * half))
    angles = positions[..., None] * inv_freq  # [b, t, half]
    sin, cos = np.sin(angles)[:, :, None], np.cos(angles)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v with key/value heads shared by groups of query heads.

    q [b, t, n, h], k and v [b, s, kv, h], mask [b, t, s] boolean.
    """
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def mask_of(segment_ids, causal=True):
    t = segment_ids.shape[1]
    order = np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool)
    return order[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def forward(params, cfg: ModelConfig, tokens, positions, segment_ids):
    """float64 logits [batch, seq, vocab] of the decoder with t2x's parameter tree."""
    p = _to_float64(params)
    x = p["embed"]["embedding"][tokens]
    if cfg.position == "learned":
        x = x + p["pos_embed"]["embedding"][positions]
    mask = mask_of(segment_ids)
    for i in range(cfg.num_layers):
        if cfg.scan_layers:
            layer = _index(p["blocks"]["layers"], i)
        else:
            layer = p["blocks"][f"layers_{i}"]
        h = _layer_norm(x, layer["attn_norm"], cfg.norm_eps, cfg)
        att = layer["attn"]
        q = _dense(h, att["query"], "btd,dnh->btnh")
        k = _dense(h, att["key"], "btd,dnh->btnh")
        v = _dense(h, att["value"], "btd,dnh->btnh")
        if cfg.position == "rope":
            q, k = _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta)
        x = x + _dense(attention(q, k, v, mask), att["out"], "btnh,nhd->btd")
        h = _layer_norm(x, layer["mlp_norm"], cfg.norm_eps, cfg)
        mlp = layer["mlp"]
        if cfg.mlp == "swiglu":
            gate = _dense(h, mlp["gate"], "btd,df->btf")
            h = gate / (1 + np.exp(-gate)) * _dense(h, mlp["up"], "btd,df->btf")
        else:
            h = _gelu_tanh(_dense(h, mlp["up"], "btd,df->btf"))
        x = x + _dense(h, mlp["down"], "btf,fd->btd")
    x = _layer_norm(x, p["final_norm"], cfg.norm_eps, cfg)
    if cfg.tie_embeddings:
        return x @ p["embed"]["embedding"].T
    return x @ p["lm_head"]["kernel"]


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _to_float64(tree):
    if isinstance(tree, dict):
        return {k: _to_float64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def _index(tree, i):
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return tree[i]
