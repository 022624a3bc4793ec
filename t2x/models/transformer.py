"""Transformer blocks (pre- or post-norm), stacked with ``nn.scan`` and wrapped in ``nn.remat``."""

from __future__ import annotations

import flax.linen as nn
import jax

from t2x.config import ModelConfig
from t2x.models.attention import Attention
from t2x.models.layers import MLP, constrain, norm

STACKED_LAYERS = "layers"  # name of the scanned stack; its parameters have a leading [layers] axis

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). Post-norm (``model.norm_position
    = post``, as BERT and the original Transformer): norm(x + attn(x)), then norm(x + mlp(x)).

    With a KV cache (every layer's, stacked), this block is layer ``layer`` of it; see
    ``Attention``. Returns x, or (x, the updated cache) with a cache. Scanned, the carry
    is x, or (x, cache) with a cache, and ``layer`` comes from the scanned axis.
    """

    cfg: ModelConfig
    deterministic: bool = True
    scanned: bool = False
    window: int | None = None

    @nn.compact
    def __call__(self, x, positions: jax.Array, mask: jax.Array, layer=None, rows: jax.Array | None = None,
                 cache: dict | None = None):
        cfg = self.cfg
        if self.scanned and isinstance(x, tuple):
            x, cache = x
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        post = cfg.norm_position == "post"
        attn_norm, mlp_norm = norm(cfg, "attn_norm"), norm(cfg, "mlp_norm")
        h = Attention(cfg, self.window, name="attn")(x if post else attn_norm(x), positions, mask, cache, layer, rows)
        if cache is not None:
            h, cache = h
        x = x + dropout(h)
        if post:
            x = attn_norm(x)
        h = MLP(cfg, name="mlp")(x if post else mlp_norm(x))
        x = x + dropout(h)
        if post:
            x = mlp_norm(x)
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, seq, d_model]
        out = x if cache is None else (x, cache)
        return (out, None) if self.scanned else out


class BlockStack(nn.Module):
    """``num_layers`` blocks: one scanned loop (parameters stacked on a leading ``layers``
    axis, so compile time does not grow with depth) or an unrolled Python loop.

    A KV cache holds every layer's keys and values stacked on a leading [layers] axis
    either way, updated in place layer by layer; with one, the stack returns (x, the
    updated cache). ``rows`` and ``window``: see ``Attention``.
    """

    cfg: ModelConfig
    deterministic: bool = True
    window: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: dict | None = None,
                 rows: jax.Array | None = None):
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layer_ids = None if cache is None else jax.numpy.arange(cfg.num_layers)
            carry = x if cache is None else (x, cache)
            out, _ = stack(cfg, self.deterministic, scanned=True, window=self.window, name=STACKED_LAYERS)(
                carry, positions, mask, layer_ids, rows
            )
            return out
        for i in range(cfg.num_layers):
            out = block(cfg, self.deterministic, window=self.window, name=f"layers_{i}")(
                x, positions, mask, i, rows, cache
            )
            x, cache = (out, None) if cache is None else out
        return x if cache is None else (x, cache)
