"""Orbax checkpoints of a run: parameters, optimizer state, data position and config.

Each step's checkpoint holds four items: ``params`` and ``opt_state`` (sharded arrays,
every process writing its own shards), ``data`` (the input pipeline's position) and
``config``. Orbax writes into a temporary directory and renames it when complete, so a
checkpoint is either whole or absent; a save interrupted by a crash leaves the previous
one as the latest. Restoring takes target shardings, so a checkpoint written on one mesh
restores onto another.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t2x.config import CheckpointConfig, ConfigError
from t2x.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the run; the message says what to do."""


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
    """Save and restore a run's checkpoints under ``directory``.

    Args:
      directory: the run's checkpoint folder.
      cfg: cadence and retention (keep the last ``keep``, plus every ``keep_every``-th step).
      read_only: open existing checkpoints without the right to write or delete.
    """

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig | None = None, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        directory = str(directory)
        # Local paths made absolute; remote ones (gs://...) as they are.
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        if read_only:  # never deletes or cleans up: a training run may be writing here
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                keep_period=cfg.keep_every,
                enable_async_checkpointing=cfg.async_save,
                cleanup_tmp_directories=True,
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, data_state: dict, config: dict) -> bool:
        """Start saving ``state`` at its step (asynchronously unless configured otherwise).

        Returns:
          False if a checkpoint of that step already exists (nothing is written).
        """
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=True)
        return True

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}; train the run first")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; it has steps {steps}")
        return step

    def data_state(self, step: int | None) -> dict:
        """The input pipeline's position and settings stored with ``step`` (None: latest)."""
        step = self._check_step(step)
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

    def restore(self, step: int | None, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
        """Restore the train state onto ``shardings`` and the data position of ``step`` (None: latest)."""
        step = self._check_step(step)
        target = _with_shardings(abstract, shardings)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(target.params),
                    opt_state=ocp.args.StandardRestore(target.opt_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not match this run's model or optimizer ({e}); "
                "use the config it was trained with, or a new train.run_dir"
            ) from None
        step_array = jax.device_put(np.int32(step), shardings.step)
        state = TrainState(step=step_array, params=restored.params, opt_state=restored.opt_state)
        return state, restored.data

    def restore_params(self, step: int | None, abstract_params: Any, shardings: Any) -> tuple[Any, int]:
        """Restore only the parameters of ``step`` (None: latest) onto ``shardings``."""
        step = self._check_step(step)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_with_shardings(abstract_params, shardings)))
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not match this model ({e}); "
                "use the config it was trained with"
            ) from None
        return restored.params, step

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_data_state(saved: dict, expected: dict) -> None:
    """Refuse to resume the input pipeline from a checkpoint made with other data settings.

    Args:
      saved: the checkpoint's data item.
      expected: this run's settings, keyed by the config key they come from.
    """
    for key, value in expected.items():
        if saved.get(key) != value:
            what = "are different files, format or text field" if key == "training data" else f"is {value!r}"
            raise ConfigError(
                f"{key} {what}, but the checkpoint's input position was made with {saved.get(key)!r}; "
                f"resume with the settings the run was trained with, or start a new train.run_dir"
            )
