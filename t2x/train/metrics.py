"""Metrics sinks: ``metrics.jsonl`` and TensorBoard event files, written by process 0."""

from __future__ import annotations

import json
import os
import time

import tensorflow as tf


class MetricsWriter:
    """Appends ``{"split", "step", ...metrics}`` lines to ``metrics.jsonl`` and writes the
    same scalars to ``tensorboard/<split>``. A ``"resume"`` record marks where a resumed
    launch continues: records of later steps supersede earlier ones. A disabled writer
    (other processes) does nothing."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self._run_dir = run_dir
        self._writers: dict[str, tf.summary.SummaryWriter] = {}
        self._jsonl = tf.io.gfile.GFile(os.path.join(run_dir, "metrics.jsonl"), "a") if enabled else None

    def write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, **metrics, "time": round(time.time(), 3)}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if not scalars:
            return
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(os.path.join(self._run_dir, "tensorboard", split))
        with self._writers[split].as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        self._writers[split].flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        for writer in self._writers.values():
            writer.close()
