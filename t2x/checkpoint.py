"""Orbax checkpoints that are never silently wrong.

A step's checkpoint holds array items (``params``, ``opt_state``: sharded, every process
writing its own shards), JSON items (``data``: the input pipeline's position, ``config``)
and ``checksums``: two 32-bit weighted sums of every saved array's bits, computed on the
devices before the save, and a SHA-256 of each JSON item. Restoring verifies them, so a
flipped bit, a truncated or missing file or a deleted item is reported as damage naming
the step, the item and what is wrong, and a checkpoint that does not fit the model is
reported as such.

Orbax writes a step into a temporary directory and renames it when complete, so a step
is either whole or absent. Deleting a step removes its step metadata first, so a kill
during deletion never leaves half a step that is listed; a damaged step is moved to
``_damaged/`` rather than deleted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from t2x.config import CheckpointConfig

log = logging.getLogger(__name__)


class _OrbaxNotices(logging.Filter):
    """Orbax warns on every read-only open (how eval and resume checks open a run) and
    when its array handler is replaced (see ``_configure_array_writes``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Given directory is read only") or "overriding jax.Array" in message)


logging.getLogger("absl").addFilter(_OrbaxNotices())

ARRAY_ITEMS = ("params", "opt_state")
JSON_ITEMS = ("data", "config")
CHECKSUMS = "checksums"
MIN_SLICE_BYTES = 1 << 20  # replicated arrays smaller than this are written by one replica
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax writes it into every finished step
DELETING = "_T2X_DELETING"  # marks a step whose deletion has begun
TMP_MARK = ".orbax-checkpoint-tmp"  # in the names of steps Orbax has not finished writing
DAMAGED = "_damaged"  # damaged steps set aside


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the run; the message says what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, unreadable or fail their checksums."""

    def __init__(self, directory, step: int, item: str, problem: str):
        self.step, self.item, self.problem = step, item, problem
        super().__init__(f"checkpoint {step} in {directory} is damaged: {item}: {problem}")


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose arrays do not have the names or shapes the run expects."""

    def __init__(self, step: int, item: str, differences: list[str]):
        self.step, self.item = step, item
        super().__init__(f"checkpoint {step} does not fit this run's {item}: {_sample(differences)}")


def _sample(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


# Checksums -------------------------------------------------------------------------

def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a well-spread weight per flat index."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """Two sums over the array's bits, each element weighted by an odd number that depends
    on its index: any single flipped bit changes both, and so does any moved element.
    Integer sums wrap exactly, so the result is the same on any mesh."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    else:  # 8-byte values: two 32-bit words each
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for axis, size in enumerate(bits.shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    weight = _mix(index + jnp.uint32(0x9E3779B9))
    return jnp.stack([jnp.sum(bits * (weight | 1), dtype=jnp.uint32),
                      jnp.sum(bits * (_mix(weight) | 1), dtype=jnp.uint32)])


_digest_tree = jax.jit(lambda tree: jax.tree.map(_leaf_digest, tree))


def array_checksums(tree: Any) -> dict[str, list[int]]:
    """``{path: [sum1, sum2]}`` for every array of ``tree`` (a collective in multi-process jobs)."""
    digests = jax.device_get(_digest_tree(tree))
    return {_path(p): [int(v) for v in d] for p, d in jax.tree_util.tree_flatten_with_path(digests)[0]}


def json_checksum(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _path(keys) -> str:
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    return {_path(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


_READER_NOISE = ("Event loop is closed", "Python is likely shutting down",
                 "Encountered error while reading array index")


def _quiet_closed_loop_noise() -> None:
    """After a failed read, Orbax's reader threads and coroutines report their event loop
    closing (and, at exit, the interpreter shutting down) through ``sys.unraisablehook``,
    and each of the array's other shard reads, closed unfinished once the first failed,
    reports its own read error with its TensorStore spec; the failure itself is reported
    once, as damage."""
    previous = sys.unraisablehook
    if getattr(previous, "_t2x", False):
        return

    def hook(unraisable):
        if any(noise in str(unraisable.exc_value) for noise in _READER_NOISE):
            return
        previous(unraisable)

    hook._t2x = True
    sys.unraisablehook = hook


def _from_process_zero(values: list[int]) -> list[int]:
    """Process 0's list of integers, on every process."""
    if jax.process_count() == 1:
        return values
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    padded = np.full(max(count, 1), -1, np.int32)
    if jax.process_index() == 0:
        padded[:count] = values
    return [int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(padded))[:count]]


def _all_processes_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _first_line(e: BaseException) -> str:
    """The most specific line an error chain offers (TensorStore's own reason, not the
    Orbax wrapper around it), without the storage spec."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip() or type(e).__name__
    text = re.sub(r' in OCDBT database at [^:]*"[^"]*"', "", text.splitlines()[0])
    return text[:400]


@functools.cache
def _configure_array_writes(multi_process: bool) -> None:
    """Orbax splits a replicated array into slices that its replicas write side by side,
    so that several hosts share the writing. Each distinct slice is a compiled program:
    that is worth it for large arrays on several hosts, not for small ones, nor in one
    process (which writes every slice itself). Orbax takes the setting only through its
    global registry of type handlers."""
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            use_replica_parallel=multi_process, min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES
        ),
        override=True,
    )


def _delete_step(folder: epath.Path) -> None:
    """Mark a step as being deleted, remove its step metadata (it is no longer listed),
    then its files, and the mark last: a kill at any point leaves a folder that is never
    listed and that the next start finishes deleting."""
    if not folder.exists():
        return
    (folder / DELETING).write_text("")
    if (folder / STEP_METADATA).exists():
        (folder / STEP_METADATA).unlink()
    for entry in folder.iterdir():
        if entry.name != DELETING:
            _remove(entry)
    _remove(folder)


def _remove(path: epath.Path) -> None:
    """Delete a file or folder; one that something else removes meanwhile is fine."""
    try:
        path.rmtree() if path.is_dir() else path.unlink()
    except FileNotFoundError:
        pass


# Retention -------------------------------------------------------------------------

def steps_to_delete(steps: Sequence[int], keep: int, keep_every: int | None, unconfirmed: int | None) -> list[int]:
    """Steps retention removes: all but the newest ``keep`` and multiples of ``keep_every``.

    ``unconfirmed`` (the newest save, not yet followed by finite training) is kept without
    counting toward ``keep``: if the run then goes non-finite, the ``keep`` checkpoints
    before it are still there.
    """
    counted = sorted(s for s in steps if s != unconfirmed)
    kept = set(counted[-keep:]) | ({unconfirmed} if unconfirmed in steps else set())
    if keep_every:
        kept |= {s for s in steps if s % keep_every == 0}
    return [s for s in sorted(steps) if s not in kept]


# The checkpointer ------------------------------------------------------------------

class Checkpointer:
    """Save, verify and restore a run's checkpoints under ``directory``.

    Args:
      directory: the run's checkpoint folder.
      cfg: write settings (asynchronous saves).
      read_only: open existing checkpoints without the right to write, move or delete.
    """

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig | None = None, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        directory = str(directory)
        # Local paths made absolute; remote ones (gs://...) as they are.
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        self.read_only = read_only
        if read_only:  # never deletes or cleans up: a training run may be writing here
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None,  # retention is t2x's: see steps_to_delete
                enable_async_checkpointing=cfg.async_save,
                cleanup_tmp_directories=True,
            )
        _configure_array_writes(jax.process_count() > 1)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # step of a save that may still be writing
        if not read_only:
            self._remove_partial()
            self._finish_deletes()

    # Listing.

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints, ascending, as process 0 sees them (it finishes
        every save, so the others may see one late). A step whose directory has lost
        Orbax's step metadata (the first file a non-atomic delete removes) is not one.
        Every process must call this."""
        return _from_process_zero(self.local_steps() if jax.process_index() == 0 else [])

    def local_steps(self) -> list[int]:
        """The complete steps this process sees, for messages (no collective: safe on an error path)."""
        return sorted(s for s in self.manager.all_steps() if (self.directory / str(s) / STEP_METADATA).exists())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def check_step(self, step: int | None) -> int:
        """``step``, or the latest when None; an error naming the steps there are otherwise."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}; train the run first")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; it has steps {steps}")
        return step

    # Saving.

    def save(self, step: int, arrays: dict[str, Any], json_items: dict[str, Any]) -> bool:
        """Start saving ``arrays`` (trees of global jax.Arrays) and ``json_items`` at
        ``step``, with their checksums (asynchronously unless configured otherwise).

        Returns:
          False if a checkpoint of that step already exists (nothing is written).

        Raises:
          CheckpointError: this save, or the previous asynchronous one, failed (a full
            disk, say); no partial checkpoint is left where a restore would find it.
        """
        if step in self.all_steps():
            return False
        remnant = jax.process_index() == 0 and (self.directory / str(step)).exists()
        if _from_process_zero([step] if remnant else []):  # a folder without step metadata
            log.warning("moved an incomplete checkpoint %d to %s", step, self.set_aside(step))
        if step in self.manager.all_steps():  # Orbax still lists a step deleted earlier
            self._reload()
        checksums = {
            "arrays": {item: array_checksums(tree) for item, tree in arrays.items()},
            "json": {item: json_checksum(value) for item, value in json_items.items()},
        }
        args = {item: ocp.args.StandardSave(tree) for item, tree in arrays.items()}
        args.update({item: ocp.args.JsonSave(value) for item, value in json_items.items()})
        args[CHECKSUMS] = ocp.args.JsonSave(checksums)
        self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(**args), force=True), step)
        self._pending = step
        return True

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk.

        Raises:
          CheckpointError: a pending save failed.
        """
        self._guard(self.manager.wait_until_finished, self._pending)
        self._pending = None

    def _guard(self, action, step: int | None) -> None:
        try:
            action()
        except Exception as e:  # Orbax and TensorStore raise plain Exceptions for I/O failures
            if isinstance(e, CheckpointError):
                raise
            pending, self._pending = self._pending, None
            failed = pending if pending is not None else step
            self._remove_partial()
            intact = [s for s in self.local_steps() if s != failed]
            where = f"step {max(intact)} is the newest complete checkpoint" if intact else "no earlier checkpoint exists"
            raise CheckpointError(
                f"saving the checkpoint of step {failed} in {self.directory} failed ({_first_line(e)}); "
                f"nothing partial is kept and {where}. Free space or fix the filesystem, then rerun to resume"
            ) from None

    # Deleting and setting aside.

    def delete(self, steps: Sequence[int]) -> None:
        """Delete ``steps`` (every process calls this, with the same steps; process 0 does
        the work). A step's metadata goes first: from then on it is not listed, so a kill
        halfway through leaves nothing a restore would pick."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                _delete_step(self.directory / str(step))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"t2x deleted checkpoints {list(steps)}")

    def retain(self, keep: int, keep_every: int | None, unconfirmed: int | None) -> None:
        """Delete what ``steps_to_delete`` allows (every process calls this)."""
        self.delete(steps_to_delete(self.all_steps(), keep, keep_every, unconfirmed))

    def _finish_deletes(self) -> None:
        """Finish deleting the steps a kill interrupted (they carry the deletion mark)."""
        if jax.process_index() == 0 and self.directory.exists():
            for entry in self.directory.iterdir():
                if entry.is_dir() and (entry / DELETING).exists():
                    _delete_step(entry)

    def _remove_partial(self) -> None:
        """Remove what an interrupted or failed save left (Orbax's temporary folders)."""
        if jax.process_index() == 0 and self.directory.exists():
            for entry in self.directory.iterdir():
                if TMP_MARK in entry.name:
                    _remove(entry)

    def set_aside(self, step: int) -> str:
        """Move a damaged step to ``_damaged/`` (kept for inspection, out of every listing).

        Returns:
          Where it went.
        """
        target = self.directory / DAMAGED / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            (self.directory / DAMAGED).mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"t2x set aside checkpoint {step}")
        self._reload()
        return str(target)

    def _reload(self) -> None:
        """Make Orbax list the steps on disk again. It would forget a save still in
        flight, so that save is finished first."""
        self.wait()
        self.manager.reload()

    # Reading.

    def read_json(self, step: int, item: str) -> Any:
        """A JSON item of ``step``, checked against its checksum when the step has one.

        Raises:
          DamagedCheckpointError: the item is missing, unreadable or fails its checksum.
        """
        value = self._read_json(step, item)
        expected = self._checksums(step).get("json", {}).get(item)
        if expected is not None and json_checksum(value) != expected:
            raise DamagedCheckpointError(self.directory, step, item, "its contents do not match their checksum")
        return value

    def _read_json(self, step: int, item: str) -> Any:
        path = self.directory / str(step) / item
        try:
            return ocp.JsonCheckpointHandler().restore(path, ocp.args.JsonRestore())
        except Exception as e:  # missing directory or file, or not JSON
            missing = not path.exists()
            raise DamagedCheckpointError(
                self.directory, step, item, "the item is missing" if missing else f"cannot be read ({_first_line(e)})"
            ) from None

    def _checksums(self, step: int) -> dict:
        """The step's checksums; ``{}`` for a checkpoint written before t2x recorded them."""
        if not (self.directory / str(step) / CHECKSUMS).exists():
            return {}
        return self._read_json(step, CHECKSUMS)

    def has_checksums(self, step: int) -> bool:
        return (self.directory / str(step) / CHECKSUMS).exists()

    def saved_shapes(self, step: int, item: str) -> dict[str, tuple]:
        """``{path: shape}`` of an array item as saved.

        Raises:
          DamagedCheckpointError: the item's metadata is missing or unreadable.
        """
        _quiet_closed_loop_noise()
        path = self.directory / str(step) / item
        try:
            return _leaf_shapes(ocp.StandardCheckpointHandler().metadata(path))
        except Exception as e:
            problem = "the item is missing" if not path.exists() else f"its metadata cannot be read ({_first_line(e)})"
            raise DamagedCheckpointError(self.directory, step, item, problem) from None

    def restore(self, step: int, abstract: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
        """Restore array items of ``step`` onto ``shardings`` and verify their checksums.

        Args:
          step: an existing step (``check_step``).
          abstract: item -> tree of ShapeDtypeStructs the run expects.
          shardings: item -> matching tree of shardings (any mesh).

        Returns:
          item -> restored tree.

        Raises:
          CheckpointMismatchError: the checkpoint is readable but its arrays have other
            names or shapes than the run's.
          DamagedCheckpointError: files are missing, unreadable, or fail their checksums.
        """
        # Before any read: a failed read's other threads report their noise as it fails.
        _quiet_closed_loop_noise()
        checksums = self._checksums(step).get("arrays", {})
        restored = {}
        for item, tree in abstract.items():
            target = _with_shardings(tree, shardings[item])
            problem = None
            try:
                restored[item] = self.manager.restore(
                    step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
                )[item]
            except Exception as e:  # Orbax and TensorStore raise plain Exceptions
                problem = e
            if not _all_processes_ok(problem is None):
                self._explain_failure(step, item, tree, problem)
            if item in checksums:
                got = array_checksums(restored[item])
                bad = sorted(p for p, v in got.items() if checksums[item].get(p) != v)
                if bad:
                    raise DamagedCheckpointError(
                        self.directory, step, item, f"{_sample(bad)} do not match their checksums"
                    )
        return restored

    def _explain_failure(self, step: int, item: str, expected: Any, error: BaseException | None):
        """Tell a checkpoint that does not fit the run from a damaged one."""
        saved = self.saved_shapes(step, item)
        wanted = _leaf_shapes(expected)
        differences = (
            [f"{p} is missing" for p in sorted(wanted) if p not in saved]
            + [f"{p} is not expected" for p in sorted(saved) if p not in wanted]
            + [f"{p} has shape {saved[p]}, not {wanted[p]}" for p in sorted(wanted) if p in saved and saved[p] != wanted[p]]
        )
        if differences:
            raise CheckpointMismatchError(step, item, differences)
        if error is None:  # another process could not read its part
            raise DamagedCheckpointError(self.directory, step, item, "another process could not read its part")
        raise DamagedCheckpointError(self.directory, step, item, _first_line(error))

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def restore_params(directory: str, step: int | None, abstract: Any, shardings: Any, on_damage: str = "fallback") -> tuple[Any, int]:
    """The parameters of a checkpoint, restored onto ``shardings`` and verified.

    ``step`` None takes the newest checkpoint that verifies (an older one, with a warning,
    when newer ones are damaged and ``on_damage`` is ``fallback``); a given step must
    verify. Nothing in ``directory`` is changed.

    Returns:
      (parameters, the step they are of).

    Raises:
      CheckpointError: no checkpoint (of that step), or it is damaged or does not fit.
    """
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        candidates = [checkpointer.check_step(step)] if step is not None else checkpointer.all_steps()[::-1]
        if not candidates:
            checkpointer.check_step(None)  # raises: no checkpoint
        for candidate in candidates:
            try:
                return checkpointer.restore(candidate, {"params": abstract}, {"params": shardings})["params"], candidate
            except CheckpointMismatchError as e:
                raise CheckpointError(f"{e}; use the model config it was trained with") from None
            except DamagedCheckpointError as e:
                if step is not None or on_damage == "stop":
                    raise
                log.warning("%s; using the checkpoint before it", e)
        raise CheckpointError(f"no checkpoint in {checkpointer.directory} verifies; see the warnings above")
    finally:
        checkpointer.close()
