"""Model FLOPs and MFU: the one place they are counted.

Convention (MaxText's ``calculate_tflops_training_per_device``): a training step costs
3x the forward pass; the forward pass costs 2 FLOPs per multiply-accumulate over every
matmul weight (the unembedding included, the input embedding excluded) plus attention's
4 * batch * seq^2 * heads * head_dim per layer, halved for causal attention.
"""

from __future__ import annotations

from t2x.config import Config, ModelConfig

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
    (and an encoder's masked-LM transform; an encoder-decoder's decoder blocks with their
    cross-attention)."""
    attention, mlp = _block_params(cfg)
    decoder = cfg.decoder_layers * (2 * attention + mlp) if cfg.family == "encoder_decoder" else 0
    return cfg.num_layers * (attention + mlp) + decoder + _head_params(cfg)


def _head_params(cfg: ModelConfig) -> int:
    """The unembedding's weights (and an encoder's masked-LM transform's)."""
    return cfg.d_model * (cfg.vocab_size + (cfg.d_model if cfg.family == "encoder" else 0))


def _block_params(cfg: ModelConfig) -> tuple[int, int]:
    """A block's attention projections' and MLP's weights (an encoder-decoder's decoder
    block adds a second attention)."""
    d, heads, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    return d * (heads + 2 * kv) * hd + heads * hd * d, d * cfg.d_ff * (3 if cfg.mlp in ("swiglu", "geglu") else 2)


def run_flops_per_step(cfg: Config, target_len: int | None = None) -> float:
    """Model FLOPs of one training step of a run's config over its global batch: its
    family's model (an encoder's masked-LM head at ``objective.predictions_per_row``
    positions), or with ``classify.labels`` the classifier's: the backbone without its
    language-model head (an encoder-decoder's encoder alone), whose pooler and label
    layer, a few products of a d_model vector a row, are left out."""
    m, batch, seq = cfg.model, cfg.train.global_batch_size, cfg.data.seq_len
    if not cfg.classify.enabled:
        return training_flops_per_step(m, batch, seq, target_len=target_len,
                                       predictions=cfg.objective.predictions_per_row(seq))
    return 3.0 * _blocks_forward_flops(m, batch, seq, causal=m.family == "decoder")


def _blocks_forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int, causal: bool) -> float:
    """Forward FLOPs of ``cfg.num_layers`` self-attention blocks: their products and
    attention's scores (halved for causal attention)."""
    dense = 2 * batch_size * seq_len * cfg.num_layers * sum(_block_params(cfg))
    scores = 4 * batch_size * cfg.num_heads * cfg.head_size * seq_len**2 * cfg.num_layers
    return dense + (scores / 2 if causal else scores)


def training_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int, causal: bool | None = None,
                            target_len: int | None = None, predictions: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward) over a global batch.

    Args:
      cfg: model shape.
      batch_size: sequences in the global batch.
      seq_len: tokens per sequence (an encoder-decoder's input rows).
      causal: count attention scores at half, as only the lower triangle is needed
        (default: for decoders).
      target_len: an encoder-decoder's target rows (default ``seq_len``): its decoder
        runs over these, its encoder over ``seq_len``.
      predictions: an encoder's positions per row at which its masked-LM head (transform
        and vocabulary projection) runs (default ``seq_len``;
        ``ObjectiveConfig.predictions_per_row``).
    """
    if causal is None:
        causal = cfg.family == "decoder"
    if cfg.family == "encoder_decoder":
        per_head = 4 * batch_size * cfg.num_heads * cfg.head_size
        t, d, heads, kv, hd = target_len or seq_len, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
        query_out, key_value = 2 * d * heads * hd, 2 * d * kv * hd  # projections of queries and outputs; keys and values
        mlp = d * cfg.d_ff * (3 if cfg.mlp in ("swiglu", "geglu") else 2)
        encoder = seq_len * cfg.num_layers * (query_out + key_value + mlp)
        # Decoder: self-attention and MLP over the targets, cross-attention's queries and
        # outputs over the targets and its keys and values over the inputs.
        decoder = cfg.decoder_layers * (t * (2 * query_out + key_value + mlp) + seq_len * key_value)
        dense = 2 * batch_size * (encoder + decoder + t * d * cfg.vocab_size)
        scores = per_head * (cfg.num_layers * seq_len**2 + cfg.decoder_layers * (t**2 / 2 + t * seq_len))
        return 3.0 * (dense + scores)
    positions = min(predictions, seq_len) if cfg.family == "encoder" and predictions is not None else seq_len
    head = 2 * batch_size * positions * _head_params(cfg)
    return 3.0 * (_blocks_forward_flops(cfg, batch_size, seq_len, causal) + head)


def peak_flops_per_device(device_kind: str, override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a device kind, or None when it is not known."""
    if override:
        return override
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None
