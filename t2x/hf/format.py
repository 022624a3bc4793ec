"""What every Hugging Face architecture shares: the directory's file names, reading its
``config.json`` and safetensors weights (one file or shards), taking tensors by name
once each, the dtypes t2x reads, and how a refused export reads.

Only safetensors files are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Any, NoReturn

import numpy as np

from t2x.export import ExportError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Buffers some checkpoints carry beside their parameters (GPT-2's causal mask, older
# Llamas' rotary frequencies, older BERTs' position and token-type ids): recomputed by
# both implementations, so never read.
_BUFFERS = (
    ".attn.bias",
    ".attn.masked_bias",
    ".rotary_emb.inv_freq",
    "embeddings.position_ids",
    "embeddings.token_type_ids",
)


def refuse_export(option: str, why: str) -> NoReturn:
    """Raise the ExportError of a config that has no exact Hugging Face counterpart,
    naming the option that prevents it."""
    raise ExportError(f"--format hf: {option} cannot be exported exactly: {why}")


def refuse_import(hf: dict, key: str, why: str) -> NoReturn:
    """Raise the ExportError of a ``config.json`` option t2x cannot reproduce, naming it."""
    raise ExportError(f"config.json {key}={hf.get(key)!r}: {why}; t2x imports plain GPT-2, Llama, BERT and T5 models")


def read_json(path: str, what: str) -> dict:
    """The JSON object at ``path`` (``what`` names it in errors).

    Raises:
      ExportError: the file is missing, unreadable or not a JSON object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ExportError(
            f"{os.path.dirname(path)} has no {os.path.basename(path)}: it is not a Hugging Face model directory"
        ) from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is unreadable ({what}): {e}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} is not a JSON object")
    return value


def read_weights(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of ``hf_dir``'s ``model.safetensors`` (or of the shards its index names),
    by the name the checkpoint gives it.

    Raises:
      ExportError: no safetensors weights (pickled ones are named, not read), or a file
        that cannot be read.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = os.path.join(hf_dir, WEIGHTS_INDEX)
    if os.path.isfile(index):
        shards = sorted(set(read_json(index, "the weights index").get("weight_map", {}).values()))
    elif os.path.isfile(os.path.join(hf_dir, WEIGHTS)):
        shards = [WEIGHTS]
    else:
        pickled = [f for f in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(hf_dir, f))]
        hint = (
            f" (it has {pickled[0]}: t2x reads no pickled weights; save them with safe_serialization)"
            if pickled
            else ""
        )
        raise ExportError(f"{hf_dir} has no {WEIGHTS} or {WEIGHTS_INDEX}{hint}")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        try:
            tensors |= load_file(os.path.join(hf_dir, shard))
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"{hf_dir}/{shard} is unreadable: {e}") from None
    return tensors


class Tensors:
    """Takes named tensors (their names with or without the model's prefix), once each,
    and names what is missing, misshapen or left over as the checkpoint names it."""

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str, where: str):
        self.names = {k.removeprefix(prefix): k for k in tensors if not k.endswith(_BUFFERS)}
        self.tensors = {short: tensors[k] for short, k in self.names.items()}
        self.prefix, self.where = prefix, where

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name`` (without the prefix), which must have ``shape``."""
        if name not in self.tensors:
            raise ExportError(f"{self.where} has no tensor {self.prefix}{name}")
        value = self.tensors.pop(name)
        if value.shape != tuple(shape):
            raise ExportError(
                f"{self.where}: {self.names[name]} has shape {value.shape}, not {tuple(shape)} as config.json implies"
            )
        return value

    def drop(self, prefixes: tuple[str, ...]) -> list[str]:
        """Leave out the tensors whose names (without the prefix) start with one of
        ``prefixes``; returns their names in the checkpoint."""
        dropped = sorted(k for k in self.tensors if k.startswith(prefixes))
        for k in dropped:
            del self.tensors[k]
        return sorted(self.names[k] for k in dropped)

    def done(self) -> None:
        """Raise an ExportError naming the tensors nobody took."""
        if self.tensors:
            names = ", ".join(self.names[k] for k in sorted(self.tensors)[:5])
            raise ExportError(f"{self.where} has tensors a plain model does not: {names}")


def float32_or_bfloat16(params: Any, where: str) -> Any:
    """``params`` with float16 and float64 tensors widened or narrowed to float32, float32
    and bfloat16 ones unchanged.

    Raises:
      ExportError: a tensor of another dtype.
    """
    import jax
    import ml_dtypes

    def convert(x: np.ndarray) -> np.ndarray:
        if x.dtype in (np.float32, ml_dtypes.bfloat16):
            return np.ascontiguousarray(x)
        if x.dtype in (np.float16, np.float64):
            return np.ascontiguousarray(x, np.float32)
        raise ExportError(f"{where} holds {x.dtype} weights; t2x reads float32, bfloat16, float16 or float64")

    return jax.tree.map(convert, params)
