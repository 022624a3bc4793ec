"""The run directory: resolved config, tokenizer, checkpoints, metrics and TensorBoard events.

    RUN_DIR/config.yaml        the resolved config of the latest launch
    RUN_DIR/tokenizer.model    the SentencePiece model the run trains with
    RUN_DIR/checkpoints/       Orbax checkpoints, one folder per step
    RUN_DIR/metrics.jsonl      one JSON object per logged train or eval point
    RUN_DIR/tensorboard/       event files (train/, eval/)
"""

from __future__ import annotations

import os
import pathlib
import tempfile

from t2x.config import Config, ConfigError, load_config, to_yaml

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINTS = "checkpoints"


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def check_writable(cfg: Config) -> pathlib.Path:
    """Create the run directory if needed and make sure files can be written in it."""
    path = pathlib.Path(cfg.train.run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"train.run_dir {str(path)!r} is not writable ({e.strerror or e}); choose another directory"
        ) from None
    return path


def write_run_files(path: pathlib.Path, cfg: Config, tokenizer_proto: bytes) -> None:
    """Record the resolved config and the tokenizer in the run directory."""
    _write_atomic(path / CONFIG_FILE, to_yaml(cfg).encode())
    _write_atomic(path / TOKENIZER_FILE, tokenizer_proto)


def load_run(target: str, overrides: list[str]) -> tuple[Config, pathlib.Path]:
    """Config and run directory from a run directory or a config file.

    Args:
      target: a run directory (holding ``config.yaml``) or a YAML config whose
        ``train.run_dir`` names the run.
      overrides: dotted ``key=value`` overrides applied on top.
    """
    if os.path.isdir(target):
        config_path = os.path.join(target, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise ConfigError(f"{target} is not a run directory: it has no {CONFIG_FILE}")
        cfg = load_config(config_path, overrides)
        return cfg, pathlib.Path(target)
    cfg = load_config(target, overrides)
    return cfg, pathlib.Path(cfg.train.run_dir)


def tokenizer_spec(cfg: Config, run_dir: pathlib.Path) -> str:
    """The run's own copy of its tokenizer when it has one, else the configured spec."""
    own = run_dir / TOKENIZER_FILE
    return str(own) if own.is_file() else cfg.data.tokenizer
