"""Input data: sources, SentencePiece tokenizers, packing and the tf.data pipeline."""

import os

# TensorFlow serves tf.data here and nothing else: keep its start-up logging and
# oneDNN float kernels (which tf.data's integer and string work never uses) quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import importlib  # noqa: E402

# Imported on first use: inference reads tokenizers without loading TensorFlow.
_HOMES = {
    "DataError": "sources",
    "DataStats": "sources",
    "Source": "sources",
    "Tokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"t2x.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module 't2x.data' has no attribute {name!r}")


__all__ = ["DataError", "DataStats", "Source", "Tokenizer", "TokenizerError", "load_tokenizer", "train_tokenizer"]
