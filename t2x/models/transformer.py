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

    With ``cross`` (an encoder-decoder's decoder), a cross-attention sub-layer to the
    encoder's states ``encoded`` [batch, enc_len, d_model] (masked by ``cross_mask``)
    sits between the two, normed by ``cross_norm`` the same way. ``bias`` is added to
    the self-attention logits only (T5's relative positions).

    With a KV cache (every layer's, stacked), this block is layer ``layer`` of it; see
    ``Attention``. Returns x, or (x, the updated cache) with a cache. Scanned, the carry
    is x, or (x, cache) with a cache, and ``layer`` comes from the scanned axis.
    """

    cfg: ModelConfig
    deterministic: bool = True
    scanned: bool = False
    window: int | None = None
    cross: bool = False
    causal: bool = False  # the self-attention mask is causal (see ``Attention``)

    @nn.compact
    def __call__(self, x, positions: jax.Array, mask: jax.Array, layer=None, rows: jax.Array | None = None,
                 cache: dict | None = None, encoded: jax.Array | None = None, cross_mask: jax.Array | None = None,
                 bias: jax.Array | None = None, segments: jax.Array | None = None):
        cfg = self.cfg
        if self.scanned and isinstance(x, tuple):
            x, cache = x
        dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        post = cfg.norm_position == "post"

        def residual(x, h, layer_norm):
            x = x + dropout(h)
            return layer_norm(x) if post else x

        attn_norm = norm(cfg, "attn_norm")
        h = Attention(cfg, self.window, causal=self.causal, name="attn")(x if post else attn_norm(x), positions, mask, cache, layer, rows,
                                                     None, bias, segments)
        if cache is not None:
            h, cache = h
        x = residual(x, h, attn_norm)
        if self.cross:
            cross_norm = norm(cfg, "cross_norm")
            h = Attention(cfg, cross=True, name="cross_attn")(x if post else cross_norm(x), positions, cross_mask,
                                                              cache, layer, rows, encoded)
            if cache is not None:
                h, cache = h
            x = residual(x, h, cross_norm)
        mlp_norm = norm(cfg, "mlp_norm")
        x = residual(x, MLP(cfg, name="mlp")(x if post else mlp_norm(x)), mlp_norm)
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, seq, d_model]
        out = x if cache is None else (x, cache)
        return (out, None) if self.scanned else out


def scan_unroll(cfg: ModelConfig, num_layers: int, backend: str | None = None) -> int:
    """Blocks per iteration of a scanned stack of ``num_layers``: ``model.scan_unroll``, or
    where it is null, the whole stack on a CPU (``backend``, default JAX's) and 1 elsewhere.

    On a CPU no loop is left, for two reasons. XLA:CPU starts what follows a loop holding
    collectives (the fully sharded weights' all-gathers, their gradients' reductions) once
    the loop has started, so a collective that does not wait for the loop's results can
    run on one device before the loop's next one and after it on another: across
    processes gloo then aborts ("op.preamble.length <= op.nbytes"), in 8 of 30 two-process
    T5 jobs here (``t2x.parallel.collectives.unordered_collectives`` finds such pairs).
    And the unrolled stack runs faster there (BERT and GPT-2 small 16-18% on a 2-core CPU,
    ``docs/performance.md``). Other backends keep the loop, whose compile time does not
    grow with depth."""
    if cfg.scan_unroll is not None:
        return cfg.scan_unroll
    return num_layers if (backend or jax.default_backend()) == "cpu" else 1


def deepest_stack(cfg: ModelConfig) -> int:
    """Layers of the model's deepest stack of blocks (an encoder-decoder has two)."""
    return max(cfg.num_layers, cfg.decoder_layers) if cfg.family == "encoder_decoder" else cfg.num_layers


def loop_left(cfg: ModelConfig, backend: str | None = None) -> bool:
    """Whether a stack of ``cfg`` compiles to an XLA while loop on ``backend`` (default
    JAX's): scanned layers with ``scan_unroll`` short of the deepest stack."""
    layers = deepest_stack(cfg)
    return cfg.scan_layers and scan_unroll(cfg, layers, backend) < layers


class BlockStack(nn.Module):
    """``num_layers`` blocks (default ``model.num_layers``): one scanned loop (parameters
    stacked on a leading ``layers`` axis, so compile time does not grow with depth;
    ``scan_unroll`` blocks per iteration) or an unrolled Python loop. ``cross``: decoder blocks of an encoder-decoder (see ``Block``).

    A KV cache holds every layer's keys and values stacked on a leading [layers] axis
    either way, updated in place layer by layer; with one, the stack returns (x, the
    updated cache). ``rows`` and ``window``: see ``Attention``.
    """

    cfg: ModelConfig
    deterministic: bool = True
    window: int | None = None
    num_layers: int | None = None
    cross: bool = False
    causal: bool = False  # the self-attention mask is causal (see ``Attention``)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: dict | None = None,
                 rows: jax.Array | None = None, encoded: jax.Array | None = None,
                 cross_mask: jax.Array | None = None, bias: jax.Array | None = None,
                 segments: jax.Array | None = None):
        cfg = self.cfg
        num_layers = self.num_layers or cfg.num_layers
        unroll = scan_unroll(cfg, num_layers)
        block = Block
        if cfg.remat != "none":
            # A loop keeps XLA from merging the recomputation with the forward pass; unrolled
            # blocks need remat's own barrier.
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers or unroll > 1)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                         nn.broadcast, nn.broadcast),
                length=num_layers,
                unroll=unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layer_ids = None if cache is None else jax.numpy.arange(num_layers)
            carry = x if cache is None else (x, cache)
            out, _ = stack(cfg, self.deterministic, scanned=True, window=self.window, cross=self.cross,
                           causal=self.causal, name=STACKED_LAYERS)(carry, positions, mask, layer_ids, rows, None, encoded, cross_mask,
                                                bias, segments)
            return out
        for i in range(num_layers):
            out = block(cfg, self.deterministic, window=self.window, cross=self.cross, causal=self.causal,
                        name=f"layers_{i}")(
                x, positions, mask, i, rows, cache, encoded, cross_mask, bias, segments
            )
            x, cache = (out, None) if cache is None else out
        return x if cache is None else (x, cache)
