"""Flax linen models. ``build_model`` picks the family named by the config."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.decoder import DecoderLM


def build_model(cfg: ModelConfig):
    """The Flax module for ``cfg.family``."""
    if cfg.family == "decoder":
        return DecoderLM(cfg)
    raise ValueError(f"unknown model.family {cfg.family!r}")


def abstract_params(model: nn.Module, seq_len: int) -> tuple[Any, Any]:
    """Shapes of the parameters (no memory used) and their logical PartitionSpecs."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda rng: model.init(rng, tokens)["params"], jax.random.key(0))
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = ["DecoderLM", "abstract_params", "build_model", "count_params"]
