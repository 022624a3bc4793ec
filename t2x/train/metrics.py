"""Metrics sinks: ``metrics.jsonl`` and TensorBoard event files, written by process 0."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None, so that it is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """One line of strict JSON (non-finite numbers become null)."""
    return json.dumps(json_safe(value), allow_nan=False)


class MetricsError(OSError):
    """The run directory's metrics cannot be written (a full disk, say)."""


class MetricsWriter:
    """Appends ``{"split", "step", ...metrics}`` lines to ``metrics.jsonl`` and writes the
    same scalars to ``tensorboard/<split>``. A ``"resume"`` record marks where a resumed
    launch continues: records of later steps supersede earlier ones. A disabled writer
    (other processes) does nothing."""

    def __init__(self, run_dir: str, enabled: bool = True):
        import tensorflow as tf  # file and TensorBoard writers; the JSON helpers above need no TensorFlow

        self._tf = tf
        self.enabled = enabled
        self._run_dir = run_dir
        self._writers: dict[str, Any] = {}
        self._jsonl = tf.io.gfile.GFile(os.path.join(run_dir, "metrics.jsonl"), "a") if enabled else None

    def write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, **metrics, "time": round(time.time(), 3)}
        try:
            self._jsonl.write(to_json(record) + "\n")
            self._jsonl.flush()
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            if not scalars:
                return
            if split not in self._writers:
                folder = os.path.join(self._run_dir, "tensorboard", split)
                self._writers[split] = self._tf.summary.create_file_writer(folder)
            with self._writers[split].as_default(step=step):
                for name, value in scalars.items():
                    self._tf.summary.scalar(name, value)
            self._writers[split].flush()
        except (OSError, self._tf.errors.OpError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
            raise MetricsError(
                f"cannot write the metrics of step {step} in {self._run_dir} ({reason}); free space or fix the "
                "filesystem, then rerun to resume from the last checkpoint"
            ) from None

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        for writer in self._writers.values():
            writer.close()
