"""Pre-norm Transformer blocks, stacked with ``nn.scan`` and wrapped in ``nn.remat``."""

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
    """x + attn(norm(x)), then x + mlp(norm(x)).

    Returns x; with a KV cache, or when scanned, (x, the layer's updated cache or None).
    """

    cfg: ModelConfig
    deterministic: bool = True
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: dict | None = None):
        cfg = self.cfg
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h = Attention(cfg, name="attn")(norm(cfg, "attn_norm")(x), positions, mask, cache)
        if cache is not None:
            h, cache = h
        x = x + dropout(h)
        h = MLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(x))
        x = x + dropout(h)
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, seq, d_model]
        return (x, cache) if self.scanned or cache is not None else x


class BlockStack(nn.Module):
    """``num_layers`` blocks: one scanned loop (parameters stacked on a leading ``layers``
    axis, so compile time does not grow with depth) or an unrolled Python loop.

    A KV cache holds every layer's keys and values stacked on a leading [layers] axis
    either way; with one, the stack returns (x, updated cache).
    """

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: dict | None = None):
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, cache = stack(cfg, self.deterministic, scanned=True, name=STACKED_LAYERS)(x, positions, mask, cache)
            return x if cache is None else (x, cache)
        layers = []
        for i in range(cfg.num_layers):
            layer = block(cfg, self.deterministic, name=f"layers_{i}")
            if cache is None:
                x = layer(x, positions, mask)
            else:
                x, updated = layer(x, positions, mask, jax.tree.map(lambda c: c[i], cache))
                layers.append(updated)
        if cache is None:
            return x
        return x, jax.tree.map(lambda *per_layer: jax.numpy.stack(per_layer), *layers)
