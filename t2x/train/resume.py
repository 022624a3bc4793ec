"""Resuming a run from its newest checkpoint that verifies.

Checkpoints are tried newest first. A checkpoint's input position must have been made
with this run's data settings (else the resume is refused, naming the key), its arrays
must fit this run's model, and every array and JSON item must match its checksum. A
damaged checkpoint is reported and, with ``checkpoint.on_damage=fallback``, the next
older one is tried; once one restores, the damaged newer ones are moved to
``checkpoints/_damaged/``, where retention never counts or deletes them. If none
verifies, nothing is moved and the run stops.

When only the optimizer's wrappers changed (``train.grad_accum_steps``,
``train.on_nonfinite``, ``optim.clip_norm`` on or off), the optimizer state carries
over: the saved state is read with the optimizer it was saved with, and its core
(moments, factors, schedule count) goes into a fresh state of the new optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from t2x.checkpoint import CheckpointError, Checkpointer, CheckpointMismatchError, DamagedCheckpointError
from t2x.config import Config, ConfigError, config_from_dict
from t2x.data.sources import Source
from t2x.data.tokenizer import Tokenizer
from t2x.train.state import (
    TrainState,
    base_opt_state,
    make_optimizer,
    opt_state_shardings,
    replace_base_opt_state,
)

log = logging.getLogger(__name__)

# Settings that change the optimizer state's structure without changing its core.
WRAPPER_SETTINGS = ("train.grad_accum_steps", "train.on_nonfinite", "optim.clip_norm")


DATA_LAYOUT, BYTE_RANGES = "data layout", "byte ranges"


def data_meta(cfg: Config, source: Source, tokenizer: Tokenizer) -> dict[str, Any]:
    """What the input pipeline's stored positions mean; a resume must match all of it."""
    d = cfg.data
    labels = {"classify.labels": list(cfg.classify.labels)} if cfg.classify.enabled else {}
    if isinstance(source, Source) and source.splits_files(d.num_shards):
        labels[DATA_LAYOUT] = BYTE_RANGES
    return labels | {
        "training data": source.fingerprint,  # files (names, sizes), format and text field, or the TFDS split
        "data.tokenizer": tokenizer.fingerprint[:16],
        "data.num_shards": d.num_shards,
        "data.seq_len": d.seq_len,
        "data.block_docs": d.block_docs,
        "data.doc_shuffle_buffer": d.doc_shuffle_buffer,
        "data.shuffle": d.shuffle,
        "data.invalid_utf8": d.invalid_utf8,
        "train.seed": cfg.train.seed,
    }


def check_data_state(saved: dict, expected: dict) -> None:
    """Refuse to resume the input pipeline from a checkpoint made with other data settings.

    Args:
      saved: the checkpoint's data item.
      expected: this run's settings, keyed by the config key they come from.
    """
    for key, value in expected.items():
        if saved.get(key) != value:
            if key == DATA_LAYOUT:
                raise ConfigError(
                    "the training files are read in byte ranges (each byte once per epoch), but the checkpoint's input "
                    "position was made by shards that each read all the files; start a new train.run_dir, or resume "
                    "with the t2x version that made the checkpoint")
            what = "are different files, format or text field" if key == "training data" else f"is {value!r}"
            raise ConfigError(
                f"{key} {what}, but the checkpoint's input position was made with {saved.get(key)!r}; "
                f"resume with the settings the run was trained with, or start a new train.run_dir"
            )


@dataclasses.dataclass
class Resumed:
    """A restored train state, the input position stored with it, and its step."""

    state: TrainState
    data_state: dict
    step: int


@dataclasses.dataclass(frozen=True)
class Target:
    """What the run expects to restore: abstract state, its shardings, the parameters'
    logical axis names and the mesh."""

    abstract: TrainState
    shardings: TrainState
    logical: Any
    mesh: Mesh


def resume(checkpointer: Checkpointer, cfg: Config, expected_data: dict, target: Target) -> Resumed | None:
    """The newest checkpoint that verifies, restored onto ``target``; None if there is none yet.

    Raises:
      ConfigError: the data settings differ from the checkpoint's.
      CheckpointError: a checkpoint does not fit the model, a damaged one was met with
        ``checkpoint.on_damage=stop``, or no checkpoint verifies.
    """
    steps = checkpointer.all_steps()
    damaged: list[DamagedCheckpointError] = []
    for step in reversed(steps):
        try:
            resumed = restore_step(checkpointer, step, cfg, expected_data, target)
        except DamagedCheckpointError as e:
            if cfg.checkpoint.on_damage == "stop":
                raise CheckpointError(
                    f"{e}; nothing was changed. Set checkpoint.on_damage=fallback to resume from the newest "
                    "checkpoint that verifies"
                ) from None
            log.warning("%s; trying the checkpoint before it", e)
            damaged.append(e)
            continue
        for bad in damaged:
            log.warning("moved damaged checkpoint %d to %s", bad.step, checkpointer.set_aside(bad.step))
        if damaged:
            log.warning("resuming from step %d, the newest checkpoint that verifies", step)
        return resumed
    if damaged:
        raise CheckpointError(
            "no checkpoint verifies: " + "; ".join(str(e) for e in damaged) + ". Nothing was moved or deleted; "
            "restore the files, or start a new train.run_dir"
        )
    return None


def restore_step(checkpointer: Checkpointer, step: int, cfg: Config, expected_data: dict, target: Target) -> Resumed:
    """Restore one checkpoint onto ``target``, verifying it (see ``resume``)."""
    data_state = checkpointer.read_json(step, "data")
    check_data_state(data_state, expected_data)  # before the (large) restore
    if not checkpointer.has_checksums(step):
        log.warning("checkpoint %d has no checksums (an earlier t2x wrote it); it is restored unverified", step)
    a, s = target.abstract, target.shardings
    try:
        params = checkpointer.restore(step, {"params": a.params}, {"params": s.params})["params"]
    except CheckpointMismatchError as e:
        raise CheckpointError(f"{e}; use the model config it was trained with, or start a new train.run_dir") from None
    try:
        opt_state = checkpointer.restore(step, {"opt_state": a.opt_state}, {"opt_state": s.opt_state})["opt_state"]
    except CheckpointMismatchError:
        opt_state = _carry_over(checkpointer, step, cfg, params, target)
    step_array = jax.device_put(np.int32(step), s.step)
    return Resumed(TrainState(step=step_array, params=params, opt_state=opt_state), data_state, step)


def _carry_over(checkpointer: Checkpointer, step: int, cfg: Config, params: Any, target: Target) -> Any:
    """The optimizer state of ``step`` in the shape this run's optimizer needs."""
    saved_cfg = config_from_dict(checkpointer.read_json(step, "config"))
    if saved_cfg.optim.name != cfg.optim.name:
        raise CheckpointError(
            f"checkpoint {step} holds {saved_cfg.optim.name} optimizer state but optim.name is {cfg.optim.name}; "
            f"it cannot carry over: resume with optim.name={saved_cfg.optim.name}, or start a new train.run_dir"
        )
    saved_tx, _ = make_optimizer(saved_cfg)
    saved_abstract = jax.eval_shape(saved_tx.init, target.abstract.params)
    saved_shardings = opt_state_shardings(saved_abstract, target.abstract.params, target.logical, target.mesh)
    try:
        saved = checkpointer.restore(step, {"opt_state": saved_abstract}, {"opt_state": saved_shardings})["opt_state"]
    except CheckpointMismatchError as e:
        raise CheckpointError(
            f"{e}, nor the optimizer its own config describes (an earlier t2x may have written it); "
            "resume with the t2x version that wrote it, or start a new train.run_dir"
        ) from None
    tx, _ = make_optimizer(cfg)
    fresh = jax.jit(tx.init, out_shardings=target.shardings.opt_state)(params)
    changed = [
        f"{key} {_get(saved_cfg, key)} -> {_get(cfg, key)}" for key in WRAPPER_SETTINGS if _get(saved_cfg, key) != _get(cfg, key)
    ]
    log.info("carried the optimizer state of step %d over to the new settings (%s)", step, ", ".join(changed))
    return replace_base_opt_state(fresh, base_opt_state(saved, saved_cfg), cfg)


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)
