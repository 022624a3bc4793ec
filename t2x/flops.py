"""Model FLOPs and MFU: the one place they are counted.

Convention (MaxText's ``calculate_tflops_training_per_device``): a training step costs
3x the forward pass; the forward pass costs 2 FLOPs per multiply-accumulate over every
matmul weight (the unembedding included, the input embedding excluded) plus attention's
4 * batch * seq^2 * heads * head_dim per layer, halved for causal attention.
"""

from __future__ import annotations

from t2x.config import ModelConfig

# Peak dense bf16 FLOP/s per device, matched against jax.Device.device_kind.
PEAK_FLOPS = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matmuls: every block's projections plus the unembedding
    (and an encoder's masked-LM transform)."""
    d, heads, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    attention = d * (heads + 2 * kv) * hd + heads * hd * d
    mlp = d * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    head = d * d if cfg.family == "encoder" else 0
    return cfg.num_layers * (attention + mlp) + head + d * cfg.vocab_size


def training_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int, causal: bool | None = None) -> float:
    """Model FLOPs of one training step (forward + backward) over a global batch.

    Args:
      cfg: model shape.
      batch_size: sequences in the global batch.
      seq_len: tokens per sequence.
      causal: count attention scores at half, as only the lower triangle is needed
        (default: for decoders).
    """
    if causal is None:
        causal = cfg.family == "decoder"
    tokens = batch_size * seq_len
    dense = 2 * tokens * matmul_params(cfg)
    attention = 4 * batch_size * seq_len**2 * cfg.num_heads * cfg.head_size * cfg.num_layers
    if causal:
        attention /= 2
    return 3.0 * (dense + attention)


def peak_flops_per_device(device_kind: str, override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a device kind, or None when it is not known."""
    if override:
        return override
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None
