"""Export a trained model for inference, and read an export back.

An export directory is self-contained:

    EXPORT/model.safetensors   parameters only (no optimizer state), each named by its
                               flattened path (``blocks/layers/attn/query/kernel``)
    EXPORT/config.yaml         the run's resolved config
    EXPORT/tokenizer.model     the tokenizer the run trained with: a SentencePiece model,
                               or a Hugging Face tokenizer.json and tokenizer_config.json
    EXPORT/manifest.json       source run and step, dtype, parameter count, t2x version,
                               and the SHA-256 of every other file

Reading an export needs neither Orbax nor TensorFlow: safetensors, YAML, JSON and the
tokenizer's files only, nothing pickled or executed. Reading a run directory's
checkpoint (to export it, or to generate from it directly) uses Orbax, imported then.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import jax
import ml_dtypes
import numpy as np

from t2x.config import Config, ConfigError, ModelConfig, load_config, to_yaml, without_launch_settings

FORMAT = "t2x-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
FORMATS = ("t2x", "hf", "stablehlo")
SERVING = {"logits": "logits.jax_exported", "prefill": "prefill.jax_exported", "decode": "decode.jax_exported"}
SERVING_README = "SERVING.md"


class ExportError(ValueError):
    """An export that cannot be written or read; the message names what to change."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """What an export or a run directory provides for inference (parameters on the host)."""

    cfg: Config
    params: Any  # nested dict of numpy arrays
    tokenizer_files: dict[str, bytes]  # by name: tokenizer.model, or tokenizer.json (+ tokenizer_config.json)
    source: dict  # kind (export or run), path, step, and the manifest for an export


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def named_leaves(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for a nested dict (of arrays, or of their shapes)."""
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flatten(params: Any) -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` for a nested dict of arrays."""
    return {name: np.asarray(leaf) for name, leaf in named_leaves(params).items()}


def layers(params: dict, num_layers: int) -> list[dict]:
    """Each block's parameters, whether the stack is scanned (stacked on a leading axis)
    or unrolled (``layers_0``, ``layers_1``, ...)."""
    blocks = params["blocks"]
    if "layers" in blocks:
        return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), blocks["layers"]) for i in range(num_layers)]
    return [blocks[f"layers_{i}"] for i in range(num_layers)]


def stacked(per_layer: list[dict], scanned: bool) -> dict:
    """``blocks`` parameters from each block's: stacked for a scanned stack, else unrolled."""
    if scanned:
        return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}
    return {f"layers_{i}": layer for i, layer in enumerate(per_layer)}


def relayout(params: dict, m: ModelConfig) -> dict:
    """``params`` with their blocks laid out as ``m.scan_layers`` wants (stacked on a
    leading axis, or unrolled), whichever layout they came in; an encoder-decoder's
    encoder and decoder stacks each."""
    if m.family == "encoder_decoder":
        return {**params, "encoder": _relayout(params["encoder"], m.num_layers, m.scan_layers),
                "decoder": _relayout(params["decoder"], m.decoder_layers, m.scan_layers)}
    return _relayout(params, m.num_layers, m.scan_layers)


def _relayout(params: dict, num_layers: int, scan: bool) -> dict:
    if ("layers" in params["blocks"]) == scan:
        return params
    return {**params, "blocks": stacked(layers(params, num_layers), scan)}


def check_shapes(params: Any, abstract: Any, where: str) -> None:
    """Raise an ExportError naming the parameters of ``params`` that are missing, not
    expected, or of another shape than ``abstract``'s."""
    got = {k: v.shape for k, v in named_leaves(params).items()}
    want = {k: v.shape for k, v in named_leaves(abstract).items()}
    problems = [f"{k} is missing" for k in sorted(want) if k not in got]
    problems += [f"{k} is not expected" for k in sorted(got) if k not in want]
    problems += [f"{k} has shape {got[k]}, not {want[k]}" for k in sorted(want) if k in got and got[k] != want[k]]
    if problems:
        raise ExportError(f"the parameters in {where} do not fit its model config: " + "; ".join(problems[:5]))


def check_output(output: str) -> None:
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ExportError(f"--output {output} already exists and is not an empty directory; choose another")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


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
    check_dtype(dtype)
    target = DTYPES[dtype]
    return jax.tree.map(lambda x: np.asarray(x) if x.dtype == target else np.asarray(x.astype(target)), params)


@contextmanager
def staged_directory(output: str) -> Iterator[str]:
    """A staging folder next to ``output``, moved into place when the block ends without
    error (and removed when it fails), so an interrupted write leaves no directory that
    looks complete.

    Raises:
      ExportError: ``output`` exists and is not empty, or cannot be written.
    """
    output = os.path.abspath(output)
    check_output(output)
    staging = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.tmp-{os.getpid()}")
    try:
        os.makedirs(staging, exist_ok=False)
        yield staging
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.rename(staging, output)
    except OSError as e:
        raise ExportError(f"cannot write {output}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_export(
    output: str, cfg: Config, params: Any, tokenizer_files: dict[str, bytes], source: dict, dtype: str, fmt: str = "t2x",
    platforms: tuple[str, ...] | None = None,
) -> dict:
    """Write an export directory (see the module docstring) and return its manifest.

    ``fmt`` stablehlo adds the model's functions serialized with ``jax.export`` for
    ``platforms`` (default: this machine's), and a README of their inputs and outputs.

    Raises:
      ExportError: ``output`` exists and is not empty, or cannot be written.
    """
    from safetensors.numpy import save_file

    flat = flatten(cast(params, dtype))
    with staged_directory(output) as staging:
        save_file(flat, os.path.join(staging, PARAMS_FILE), metadata={"format": FORMAT})
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(to_yaml(without_launch_settings(cfg)))
        for name, data in tokenizer_files.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
        written = [PARAMS_FILE, CONFIG_FILE, *tokenizer_files]
        if fmt == "stablehlo":
            from t2x.data.tokenizer import from_files

            bos = from_files(tokenizer_files, "export").bos_id
            written += write_serving_functions(staging, cfg, flat, platforms or (jax.default_backend(),), bos)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": cfg.model.family,
            "source": source,
            "dtype": dtype,
            "parameters": int(sum(x.size for x in flat.values())),
            "t2x_version": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": {name: _sha256(os.path.join(staging, name)) for name in written},
        }
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
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
    for name in dict.fromkeys([PARAMS_FILE, CONFIG_FILE, *files]):
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
    from t2x.data.tokenizer import read_files

    tokenizer_files = read_files(path)
    if not tokenizer_files:
        raise ExportError(f"{path} is incomplete: it holds no tokenizer (tokenizer.model or tokenizer.json)")
    return Exported(cfg, params, tokenizer_files, {"kind": "export", "path": os.path.abspath(path), "manifest": manifest})


def read_run(run_dir: str, step: int | None = None) -> Exported:
    """Parameters of a run directory's checkpoint (the newest that verifies, or ``step``),
    read in this one process whatever mesh and process count wrote it."""
    from t2x.checkpoint import restore_params
    from t2x.families import task
    from t2x.models import abstract_params
    from t2x.rundir import CHECKPOINTS, load_run, tokenizer_spec

    cfg, run_dir = load_run(run_dir, [])
    abstract, _ = abstract_params(task(cfg).model(cfg.model), cfg.data.seq_len)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params, step = restore_params(os.path.join(run_dir, CHECKPOINTS), step, abstract,
                                  jax.tree.map(lambda _: device, abstract), cfg.checkpoint.on_damage)
    from t2x.data.tokenizer import load_tokenizer

    files = load_tokenizer(tokenizer_spec(cfg, run_dir)).files
    params = jax.tree.map(np.asarray, jax.device_get(params))
    return Exported(cfg, params, files, {"kind": "run", "path": os.path.abspath(run_dir), "step": step})


def read(path: str, step: int | None = None) -> Exported:
    """An export directory, or a run directory's checkpoint."""
    if is_export(path):
        if step is not None:
            raise ExportError(f"--step applies to run directories; {path} is an export of one step")
        return read_export(path)
    if not os.path.isdir(path):
        raise ExportError(f"{path} is neither an export directory nor a run directory")
    return read_run(path, step)


# Model settings that leave the parameters' meaning unchanged: a run may start from an
# export whose config differs in these.
_FREE_MODEL_SETTINGS = ("dropout", "dtype", "attention", "scan_layers", "scan_unroll", "remat", "init_std")


def _matching_export(path: str, m: ModelConfig, tokenizer_fingerprint: str) -> Any:
    """The parameters of the export (or run) at ``path`` laid out for ``m``, after
    checking that its model and tokenizer are this run's."""
    exported = read(path)
    theirs = exported.cfg.model
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        if name in _FREE_MODEL_SETTINGS or (name == "max_seq_len" and m.position == "rope"):
            continue
        if getattr(theirs, name) != getattr(m, name):
            raise ExportError(f"train.init_from {path} has model.{name}={getattr(theirs, name)}, this run "
                              f"model.{name}={getattr(m, name)}; set model.{name}={getattr(theirs, name)}")
    from t2x.data.tokenizer import from_files

    if from_files(exported.tokenizer_files, path).fingerprint != tokenizer_fingerprint:
        raise ExportError(f"train.init_from {path} was trained with another tokenizer than data.tokenizer names; "
                          f"set data.tokenizer={path} to train with its own")
    return relayout(exported.params, m)


def initial_params(path: str, m: ModelConfig, tokenizer_fingerprint: str, abstract: Any) -> Any:
    """``train.init_from``: the float32 parameters of the export (or run directory) at
    ``path``, laid out for model ``m``, to start a new run from.

    Raises:
      ExportError: the export's model differs from ``m`` (other than in dropout, dtype,
        attention, layer scanning, remat or init scale; the setting is named), its
        tokenizer is not the run's, or its parameters do not fit.
    """
    params = _matching_export(path, m, tokenizer_fingerprint)
    check_shapes(params, abstract, path)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def backbone_params(path: str, m: ModelConfig, tokenizer_fingerprint: str, abstract: Any) -> tuple[Any, list[str]]:
    """``train.init_from`` of a fine-tuning run: of the export's parameters, the float32
    ones the backbone ``abstract`` has (those of the model without its LM head), and the
    names of the others, which the run does not use.

    Raises:
      ExportError: as ``initial_params``; also when the backbone needs a parameter the
        export lacks, or one of another shape.
    """
    params = _matching_export(path, m, tokenizer_fingerprint)
    flat, want = named_leaves(params), named_leaves(abstract)
    unused = sorted(k for k in flat if k not in want)
    taken = unflatten({k: v for k, v in flat.items() if k in want})
    check_shapes(taken, abstract, path)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), taken), unused


def export_run(
    run_dir: str, output: str, step: int | None = None, dtype: str = "float32", fmt: str = "t2x",
    platforms: tuple[str, ...] | None = None,
) -> dict:
    """``t2x export``: write a run's checkpoint as an export directory (``fmt`` t2x or
    stablehlo), or as a Hugging Face model directory (``fmt`` hf); returns the manifest,
    or the Hugging Face config."""
    check_dtype(dtype)  # before the (long) read of the checkpoint, as the output
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "t2x" and not is_export(run_dir):
        from t2x.rundir import load_run

        cfg = load_run(run_dir, [])[0]
        if fmt == "stablehlo" and (cfg.model.family != "decoder" or cfg.classify.enabled):
            raise ExportError("--format stablehlo serializes a decoder language model's logits, prefill and decode; "
                              "export this model with --format t2x")
        if fmt == "hf" and cfg.classify.enabled:  # a classifier's pooling refused before the checkpoint is read
            from t2x.hf import architecture

            architecture(cfg.model, cfg.classify)
    if is_export(run_dir):
        raise ExportError(f"{run_dir} is already an export directory")
    check_output(output)
    if fmt == "hf":
        from t2x.hf import architecture, write_hf
        from t2x.rundir import load_run

        architecture(load_run(run_dir, [])[0].model)  # refused before the checkpoint is read
        return write_hf(output, read_run(run_dir, step), dtype)
    exported = read_run(run_dir, step)
    return write_export(output, exported.cfg, exported.params, exported.tokenizer_files, exported.source, dtype, fmt,
                        platforms)


def write_serving_functions(
    directory: str, cfg: Config, flat: dict[str, np.ndarray], platforms: tuple[str, ...], bos_id: int
) -> list[str]:
    """Serialize the model's logits, prefill and decode functions with ``jax.export``
    (batch and sequence length symbolic) into ``directory``; returns the files written.

    Each takes the parameters as the dict ``safetensors.numpy.load_file`` returns for
    model.safetensors, so calling them needs JAX and safetensors, not t2x.
    """
    from jax import export

    from t2x.models import build_model

    module = build_model(cfg.model)
    m, context = cfg.model, cfg.model.max_seq_len
    cache_shape = lambda b: (m.num_layers, b, context, m.kv_heads, m.head_size)  # noqa: E731
    cache_dtype = jax.numpy.bfloat16 if m.dtype == "bfloat16" else jax.numpy.float32

    def logits(params, tokens):
        return module.apply({"params": unflatten(params)}, tokens)

    def prefill(params, tokens, lengths):
        cache = {n: jax.numpy.zeros(cache_shape(tokens.shape[0]), cache_dtype) for n in "kv"}
        positions = jax.numpy.broadcast_to(jax.numpy.arange(tokens.shape[1], dtype=jax.numpy.int32), tokens.shape)
        out, cache = module.apply({"params": unflatten(params)}, tokens, positions, cache=cache, last=lengths - 1)
        return out[:, 0], cache

    def decode(params, cache, tokens, positions):
        out, cache = module.apply({"params": unflatten(params)}, tokens[:, None], positions[:, None], cache=cache)
        return out[:, 0], cache

    b, s = export.symbolic_shape("b, s", constraints=(f"s <= {context}",))
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jax.numpy.int32)  # noqa: E731
    (batch,) = export.symbolic_shape("b")  # decode has no length dimension
    cache = {n: jax.ShapeDtypeStruct(cache_shape(batch), cache_dtype) for n in "kv"}
    functions = {
        "logits": (logits, (spec, ints(b, s))),
        "prefill": (prefill, (spec, ints(b, s), ints(b))),
        "decode": (decode, (spec, cache, ints(batch), ints(batch))),
    }
    for name, (fn, args) in functions.items():
        try:
            exported = export.export(jax.jit(fn), platforms=platforms)(*args)
        except (ValueError, NotImplementedError) as e:
            raise ExportError(f"cannot serialize {name} for platforms {', '.join(platforms)}: {e}") from None
        with open(os.path.join(directory, SERVING[name]), "wb") as f:
            f.write(exported.serialize())
    with open(os.path.join(directory, SERVING_README), "w", encoding="utf-8") as f:
        f.write(_serving_readme(cfg, platforms, bos_id))
    return [*SERVING.values(), SERVING_README]


def _serving_readme(cfg: Config, platforms: tuple[str, ...], bos_id: int) -> str:
    m = cfg.model
    cache = f"[{m.num_layers}, b, {m.max_seq_len}, {m.kv_heads}, {m.head_size}] ({m.dtype})"
    return f"""# Serving functions

Serialized with `jax.export` for {", ".join(platforms)}. `b` (batch) and `s` (tokens,
at most {m.max_seq_len}) are symbolic: any sizes work without recompiling the export.
`params` is the dict that `safetensors.numpy.load_file("model.safetensors")` returns.

```python
from jax import export
from safetensors.numpy import load_file

params = load_file("model.safetensors")
logits = export.deserialize(open("logits.jax_exported", "rb").read())
out = logits.call(params, tokens)  # tokens: int32 [b, s]
```

| file | inputs | outputs |
| --- | --- | --- |
| `logits.jax_exported` | params; tokens int32 [b, s] | float32 logits [b, s, {m.vocab_size}] of the next token at every position |
| `prefill.jax_exported` | params; tokens int32 [b, s] (prompts padded on the right); lengths int32 [b] | float32 logits [b, {m.vocab_size}] after each prompt's last token; cache {{"k", "v"}} {cache} |
| `decode.jax_exported` | params; cache; tokens int32 [b]; positions int32 [b] (each token's position: its row's length so far) | float32 logits [b, {m.vocab_size}] of the token after; the updated cache |

Sequences start with the BOS token (id {bos_id}) as in training; token ids are those of
`tokenizer.model` (SentencePiece). Position p of a row's cache holds its token at
position p; a token at position p attends to positions 0..p of its row.
"""
