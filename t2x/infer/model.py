"""A model ready for inference: config, parameters placed on a mesh, tokenizer.

``load`` takes an export directory (safetensors, no Orbax, no TensorFlow) or a run
directory (its newest checkpoint that verifies, read with Orbax). The parameters are
sharded over a mesh of this process's devices by the same logical-axis rules as
training: by default one device; ``mesh.tensor=N`` or ``mesh.fsdp=N`` spread a model
too large for one device, and ``mesh.data=N`` splits the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from t2x.components import warn_of_cpu_loops
from t2x.config import Config, ConfigError, MeshConfig, load_config
from t2x.data.tokenizer import Tokenizer, from_files
from t2x.export import Exported, check_shapes, read
from t2x.families import task
from t2x.models import abstract_params
from t2x.models.layers import compute_dtype
from t2x.parallel import logical_to_shardings, make_mesh, sharding_context

CACHE_AXES = ("layers", "batch", "length", "act_kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    cfg: Config
    module: nn.Module
    params: Any  # on ``mesh``
    tokenizer: Tokenizer
    mesh: Mesh
    source: dict  # kind (export or run), path, step or manifest

    @property
    def generates(self) -> bool:
        """Whether it is a decoder language model (generate, score)."""
        return self.cfg.model.family == "decoder" and not self.cfg.classify.enabled

    @property
    def translates(self) -> bool:
        """Whether it is an encoder-decoder (generate an output for each input)."""
        return self.cfg.model.family == "encoder_decoder" and not self.cfg.classify.enabled

    @property
    def classifies(self) -> bool:
        """Whether it is a fine-tuned classifier (classify)."""
        return self.cfg.classify.enabled

    @property
    def context(self) -> int:
        """Tokens a sequence may hold, BOS included."""
        return self.cfg.model.max_seq_len

    @property
    def batch_ways(self) -> int:
        """Devices the batch is split over: batch sizes must be multiples of it."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        """A zeroed KV cache [layers, batch, length, kv_heads, head_dim] in the compute
        dtype, sharded by batch and kv heads."""
        m = self.cfg.model
        shape = (m.num_layers, batch, length, m.kv_heads, m.head_size)
        zeros = jax.jit(lambda: jnp.zeros(shape, compute_dtype(m)), out_shardings=self.cache_sharding(batch, length))
        return {"k": zeros(), "v": zeros()}

    def cache_sharding(self, batch: int, length: int) -> jax.sharding.NamedSharding:
        """How a KV cache of ``batch`` rows and ``length`` slots is laid out: by batch and
        kv heads."""
        m = self.cfg.model
        shape = (m.num_layers, batch, length, m.kv_heads, m.head_size)
        abstract = jax.ShapeDtypeStruct(shape, compute_dtype(m))
        with sharding_context(self.mesh):
            return logical_to_shardings(jax.sharding.PartitionSpec(*CACHE_AXES), abstract, self.mesh)


def mesh_overrides(overrides: Sequence[str]) -> MeshConfig:
    """The mesh of ``mesh.data=``/``mesh.fsdp=``/``mesh.tensor=`` overrides; one device by
    default. Other keys are refused: an export's model is what it was trained as."""
    other = [o for o in overrides if not o.startswith("mesh.")]
    if other:
        raise ConfigError(f"only mesh.* settings apply here, not {', '.join(other)}")
    values = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
    for o in overrides:
        key, _, value = o.partition("=")
        if key not in values:
            raise ConfigError(f"unknown mesh setting {key!r}; choose mesh.data, mesh.fsdp or mesh.tensor")
        values[key] = value
    return load_config(None, [f"{k}={v}" for k, v in values.items()]).mesh


def place(exported: Exported, mesh_cfg: MeshConfig | None = None, devices=None) -> InferenceModel:
    """Put exported parameters on a mesh of local devices."""
    cfg = exported.cfg
    mesh_cfg = mesh_cfg or MeshConfig(data=1)
    if devices is None:
        wanted = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
        devices = jax.local_devices()[: wanted if wanted > 0 else None]
    mesh = make_mesh(mesh_cfg, devices)
    warn_of_cpu_loops(cfg.model, mesh.size)
    module = task(cfg).model(cfg.model)
    tokenizer = from_files(exported.tokenizer_files, source=f"{exported.source['path']}")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is {cfg.model.vocab_size}")
    with sharding_context(mesh):
        abstract, logical = abstract_params(module, cfg.data.seq_len)
        shardings = logical_to_shardings(logical, abstract, mesh)
    check_shapes(exported.params, abstract, exported.source["path"])
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), exported.params, shardings)
    return InferenceModel(cfg, module, params, tokenizer, mesh, exported.source)


def load(path: str, step: int | None = None, overrides: Sequence[str] = (), devices=None) -> InferenceModel:
    """An export or run directory, ready for inference on the mesh ``overrides`` name."""
    return place(read(path, step), mesh_overrides(overrides), devices)
