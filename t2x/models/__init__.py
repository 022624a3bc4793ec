"""Flax linen models, one module per family (``t2x.families`` maps a family to its module)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2x.config import ModelConfig
from t2x.models.decoder import DecoderLM
from t2x.models.encdec import EncoderDecoder
from t2x.models.encoder import EncoderMLM


def build_model(cfg: ModelConfig):
    """The Flax module for ``cfg.family``."""
    from t2x.families import family

    return family(cfg.family).model(cfg)


def abstract_params(model: nn.Module, seq_len: int) -> tuple[Any, Any]:
    """Shapes of the parameters (no memory used) and their logical PartitionSpecs."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda rng: model.init(rng, tokens)["params"], jax.random.key(0))
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = ["DecoderLM", "EncoderDecoder", "EncoderMLM", "abstract_params", "build_model", "count_params"]
