"""Export a trained model for inference, and read an export back.

An export directory is self-contained:

    EXPORT/model.safetensors   parameters only (no optimizer state), each named by its
                               flattened path (``blocks/layers/attn/query/kernel``)
    EXPORT/config.yaml         the run's resolved config
    EXPORT/tokenizer.model     the SentencePiece model the run trained with
    EXPORT/manifest.json       source run and step, dtype, parameter count, t2x version,
                               and the SHA-256 of every other file

Reading an export needs neither Orbax nor TensorFlow: safetensors, YAML, JSON and the
SentencePiece model only, nothing pickled or executed. Reading a run directory's
checkpoint (to export it, or to generate from it directly) uses Orbax, imported then.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from importlib import metadata
from typing import Any

import jax
import ml_dtypes
import numpy as np

from t2x.config import Config, ConfigError, load_config, to_yaml, without_launch_settings

FORMAT = "t2x-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class ExportError(ValueError):
    """An export that cannot be written or read; the message names what to change."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """What an export or a run directory provides for inference (parameters on the host)."""

    cfg: Config
    params: Any  # nested dict of numpy arrays
    tokenizer_proto: bytes
    source: dict  # kind (export or run), path, step, and the manifest for an export


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def flatten(params: Any) -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` for a nested dict of arrays."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(str(k.key) for k in path)] = np.asarray(leaf)
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    nested: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version() -> str:
    try:
        return metadata.version("t2x")
    except metadata.PackageNotFoundError:
        return "unknown"


def cast(params: Any, dtype: str) -> Any:
    """Parameters in ``dtype``: float32 ones unchanged (bit for bit), bfloat16 ones rounded
    to nearest even as JAX rounds."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    return jax.tree.map(lambda x: np.asarray(x) if x.dtype == target else np.asarray(x.astype(target)), params)


def write_export(output: str, cfg: Config, params: Any, tokenizer_proto: bytes, source: dict, dtype: str) -> dict:
    """Write an export directory (see the module docstring) and return its manifest.

    The files are written into a staging folder next to ``output`` and moved into place
    at the end, so an interrupted export leaves no directory that looks complete.

    Raises:
      ExportError: ``output`` exists and is not empty, or cannot be written.
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ExportError(f"--output {output} already exists and is not an empty directory; choose another")
    from safetensors.numpy import save_file

    flat = flatten(cast(params, dtype))
    parent = os.path.dirname(output)
    staging = os.path.join(parent, f".{os.path.basename(output)}.tmp-{os.getpid()}")
    try:
        os.makedirs(staging, exist_ok=False)
        save_file(flat, os.path.join(staging, PARAMS_FILE), metadata={"format": FORMAT})
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(to_yaml(without_launch_settings(cfg)))
        with open(os.path.join(staging, TOKENIZER_FILE), "wb") as f:
            f.write(tokenizer_proto)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": cfg.model.family,
            "source": source,
            "dtype": dtype,
            "parameters": int(sum(x.size for x in flat.values())),
            "t2x_version": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": {name: _sha256(os.path.join(staging, name)) for name in (PARAMS_FILE, CONFIG_FILE, TOKENIZER_FILE)},
        }
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.rename(staging, output)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"cannot write the export to {output}: {e.strerror or e}") from None
    return manifest


def read_export(path: str, verify: bool = True) -> Exported:
    """Parameters (numpy, as stored), config and tokenizer of an export directory.

    Raises:
      ExportError: the manifest is missing or of another format, a file is missing, or
        (with ``verify``) a file does not match its SHA-256.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path} is not an export directory: it has no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}/{MANIFEST} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}/{MANIFEST} does not describe a {FORMAT} directory")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} was written by a newer t2x (format version {manifest['format_version']}); upgrade t2x")
    files = manifest.get("files", {})
    for name in (PARAMS_FILE, CONFIG_FILE, TOKENIZER_FILE):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ExportError(f"{path} is incomplete: {name} is missing")
        if verify and _sha256(file) != files.get(name):
            raise ExportError(f"{file} does not match the SHA-256 in its manifest: the export is damaged")
    try:
        cfg = load_config(os.path.join(path, CONFIG_FILE))
    except ConfigError as e:
        raise ExportError(f"{path}/{CONFIG_FILE}: {e}") from None
    try:
        params = unflatten(load_file(os.path.join(path, PARAMS_FILE)))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}/{PARAMS_FILE} is unreadable: {e}") from None
    with open(os.path.join(path, TOKENIZER_FILE), "rb") as f:
        tokenizer_proto = f.read()
    return Exported(cfg, params, tokenizer_proto, {"kind": "export", "path": os.path.abspath(path), "manifest": manifest})


def read_run(run_dir: str, step: int | None = None) -> Exported:
    """Parameters of a run directory's checkpoint (the newest that verifies, or ``step``),
    read in this one process whatever mesh and process count wrote it."""
    from t2x.checkpoint import restore_params
    from t2x.models import abstract_params, build_model
    from t2x.rundir import CHECKPOINTS, load_run, tokenizer_spec

    cfg, run_dir = load_run(run_dir, [])
    abstract, _ = abstract_params(build_model(cfg.model), cfg.data.seq_len)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params, step = restore_params(os.path.join(run_dir, CHECKPOINTS), step, abstract,
                                  jax.tree.map(lambda _: device, abstract), cfg.checkpoint.on_damage)
    from t2x.data.tokenizer import load_tokenizer

    proto = load_tokenizer(tokenizer_spec(cfg, run_dir)).model_proto
    params = jax.tree.map(np.asarray, jax.device_get(params))
    return Exported(cfg, params, proto, {"kind": "run", "path": os.path.abspath(run_dir), "step": step})


def read(path: str, step: int | None = None) -> Exported:
    """An export directory, or a run directory's checkpoint."""
    if is_export(path):
        if step is not None:
            raise ExportError(f"--step applies to run directories; {path} is an export of one step")
        return read_export(path)
    if not os.path.isdir(path):
        raise ExportError(f"{path} is neither an export directory nor a run directory")
    return read_run(path, step)


def export_run(run_dir: str, output: str, step: int | None = None, dtype: str = "float32") -> dict:
    """``t2x export``: write a run's checkpoint as an export directory; returns the manifest."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if is_export(run_dir):
        raise ExportError(f"{run_dir} is already an export directory")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ExportError(f"--output {output} already exists and is not an empty directory; choose another")
    exported = read_run(run_dir, step)
    return write_export(output, exported.cfg, exported.params, exported.tokenizer_proto, exported.source, dtype)
