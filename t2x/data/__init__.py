"""Input data: sources, SentencePiece tokenizers, packing and the tf.data pipeline."""

import os

# TensorFlow serves tf.data here and nothing else: keep its start-up logging and
# oneDNN float kernels (which tf.data's integer and string work never uses) quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from t2x.data.sources import DataError, DataStats, Source  # noqa: E402
from t2x.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer  # noqa: E402

__all__ = ["DataError", "DataStats", "Source", "Tokenizer", "TokenizerError", "load_tokenizer", "train_tokenizer"]
