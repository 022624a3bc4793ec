"""The mesh, tokenizer and model a config describes, built and checked against each other."""

from __future__ import annotations

import dataclasses
import logging

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from t2x.config import Config, ConfigError, ModelConfig
from t2x.data.tokenizer import Tokenizer, TokenizerError, from_files, load_tokenizer, pack, unpack
from t2x.families import family, task
from t2x.models.transformer import deepest_stack, loop_left
from t2x.parallel import make_mesh

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Components:
    """What every command needs: the device mesh, the tokenizer and the model."""

    cfg: Config
    mesh: Mesh
    tokenizer: Tokenizer
    model: nn.Module


def shared_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer ``spec`` names, loaded (or, for ``builtin:N``, trained) by process 0
    alone and used byte for byte by every process, so all of them tokenize alike."""
    if jax.process_count() == 1:
        return load_tokenizer(spec)
    data, error = b"", None
    if jax.process_index() == 0:
        try:
            data = pack(load_tokenizer(spec).files)
        except TokenizerError as e:
            error = e
    size = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if error else len(data))))
    if size < 0:
        raise error or TokenizerError(f"data.tokenizer: process 0 could not load {spec}; see its output")
    buffer = np.frombuffer(data, np.uint8) if jax.process_index() == 0 else np.zeros(size, np.uint8)
    return from_files(unpack(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()), source=spec)


def warn_of_cpu_loops(m: ModelConfig, devices: int) -> None:
    """Log a warning where a scanned stack is left as a loop on a CPU mesh of ``devices``:
    XLA:CPU can run the loop's collectives out of order with the program's others
    (``t2x.models.transformer.scan_unroll``)."""
    if devices > 1 and jax.default_backend() == "cpu" and loop_left(m):
        log.warning(
            "model.scan_unroll=%d leaves the layers in a loop, whose collectives XLA:CPU can run out of order with the "
            "program's others over %d devices (across processes, gloo then aborts: \"op.preamble.length <= "
            "op.nbytes\"); leave model.scan_unroll unset (null) on a CPU, or set it to %d",
            m.scan_unroll, devices, deepest_stack(m),
        )


def build(cfg: Config, tokenizer_spec: str | None = None, devices=None) -> Components:
    """Build the mesh, tokenizer and model of ``cfg`` and check that they fit together.

    Args:
      cfg: the run config.
      tokenizer_spec: overrides ``cfg.data.tokenizer`` (a run directory's own copy).
      devices: devices of the mesh (default: all).

    Raises:
      ConfigError: the mesh does not fit the devices, a batch does not divide over the
        data-parallel devices, or the tokenizer's vocabulary does not fit the model.
    """
    mesh = make_mesh(cfg.mesh, devices)
    warn_of_cpu_loops(cfg.model, mesh.size)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_batch = cfg.train.global_batch_size // cfg.train.grad_accum_steps
    for key, size in (
        ("train.global_batch_size / train.grad_accum_steps", micro_batch),
        ("eval.global_batch_size", cfg.eval_batch_size),
    ):
        if size % batch_ways:
            raise ConfigError(
                f"{key} = {size} is not divisible by the {batch_ways} data-parallel devices "
                f"(mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']})"
            )
    tokenizer = shared_tokenizer(tokenizer_spec or cfg.data.tokenizer)
    reserved = family(cfg.model.family).reserved_ids(cfg, tokenizer)
    needed = max([tokenizer.vocab_size - 1, *reserved]) + 1
    if needed > cfg.model.vocab_size:
        extra = f" and the {cfg.model.family}'s {len(reserved)} reserved token(s) after them" if reserved else ""
        raise ConfigError(
            f"the tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces{extra} but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size >= {needed} or use a smaller tokenizer"
        )
    return Components(cfg, mesh, tokenizer, task(cfg).model(cfg.model))
