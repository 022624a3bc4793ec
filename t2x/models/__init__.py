"""Flax linen models. ``build_model`` picks the family named by the config."""

from t2x.config import ModelConfig
from t2x.models.decoder import DecoderLM


def build_model(cfg: ModelConfig):
    """The Flax module for ``cfg.family``."""
    if cfg.family == "decoder":
        return DecoderLM(cfg)
    raise ValueError(f"unknown model.family {cfg.family!r}")


__all__ = ["DecoderLM", "build_model"]
