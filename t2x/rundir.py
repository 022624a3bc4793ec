"""The run directory: resolved config, tokenizer, checkpoints, metrics and TensorBoard events.

    RUN_DIR/config.yaml        the resolved config of the latest launch
    RUN_DIR/tokenizer.model    the tokenizer the run trains with: a SentencePiece model, or a
                               Hugging Face tokenizer.json (and its tokenizer_config.json)
    RUN_DIR/checkpoints/       Orbax checkpoints, one folder per step
    RUN_DIR/metrics.jsonl      one JSON object per logged train or eval point
    RUN_DIR/tensorboard/       event files (train/, eval/)

A run directory may be local or on any filesystem ``tf.io.gfile`` reaches (``gs://``
for a TPU pod, whose hosts must all see it); paths are therefore plain strings.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from t2x.config import Config, ConfigError, load_config, to_yaml, without_launch_settings
from t2x.data.tokenizer import FILES as TOKENIZER_FILES

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def check_writable(cfg: Config) -> str:
    """Create the run directory if needed and make sure files can be written in it."""
    path = cfg.train.run_dir
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        tf.io.gfile.makedirs(path)
        with tf.io.gfile.GFile(probe, "wb") as f:
            f.write(b"")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
        raise ConfigError(f"train.run_dir {path!r} is not writable ({reason}); choose another directory") from None
    return path


def write_run_files(path: str, cfg: Config, tokenizer_files: dict[str, bytes]) -> None:
    """Record the resolved config (launch settings left out) and the tokenizer's files in
    the run directory (replacing another tokenizer's)."""
    _write_atomic(os.path.join(path, CONFIG_FILE), to_yaml(without_launch_settings(cfg)).encode())
    for name in TOKENIZER_FILES:
        if name in tokenizer_files:
            _write_atomic(os.path.join(path, name), tokenizer_files[name])
        elif tf.io.gfile.exists(os.path.join(path, name)):
            tf.io.gfile.remove(os.path.join(path, name))


def recorded_config(run_dir: str) -> Config | None:
    """The config a run directory records, or None when it records none (or an unreadable one)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return None
    try:
        return load_config(path)
    except ConfigError:
        return None


def load_run(target: str, overrides: list[str]) -> tuple[Config, str]:
    """Config and run directory from a run directory or a config file.

    Args:
      target: a run directory (holding ``config.yaml``) or a YAML config whose
        ``train.run_dir`` names the run.
      overrides: dotted ``key=value`` overrides applied on top. A run directory's
        ``distributed.*`` settings are never used: only the overrides' are.
    """
    if tf.io.gfile.isdir(target):
        config_path = os.path.join(target, CONFIG_FILE)
        if not tf.io.gfile.exists(config_path):
            raise ConfigError(f"{target} is not a run directory: it has no {CONFIG_FILE}")
        cfg = load_config(config_path, overrides)
        # How the run was launched is not inherited (older run directories record it).
        launch = load_config(None, [o for o in overrides if o.startswith("distributed.")]).distributed
        return dataclasses.replace(cfg, distributed=launch), target
    cfg = load_config(target, overrides)
    return cfg, cfg.train.run_dir


def has_tokenizer(run_dir: str) -> bool:
    """Whether the run directory keeps a copy of its tokenizer."""
    return any(tf.io.gfile.exists(os.path.join(run_dir, name)) for name in TOKENIZER_FILES)


def tokenizer_spec(cfg: Config, run_dir: str) -> str:
    """The run's own copy of its tokenizer when it has one (the run directory), else the
    configured spec."""
    return run_dir if has_tokenizer(run_dir) else cfg.data.tokenizer
