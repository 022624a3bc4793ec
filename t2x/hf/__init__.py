"""Hugging Face format: decoders exported as ``GPT2LMHeadModel`` or ``LlamaForCausalLM``
and encoders as ``BertForMaskedLM``, with their tokenizer; such checkpoints imported as
t2x exports. The mapping is exact or refused, naming the option that prevents it.

``write`` and ``read`` are the two directions; ``decoder`` and ``bert`` map each
architecture's config and tensors; ``tokenizer`` writes ``tokenizer.json``; ``format``
holds what they share (file names, reading weights, taking tensors by name).
"""

from t2x.hf.bert import MASKED_LM as BERT
from t2x.hf.decoder import GPT2, LLAMA
from t2x.hf.format import WEIGHTS, WEIGHTS_INDEX
from t2x.hf.read import import_hf, read_hf
from t2x.hf.tokenizer import sentencepiece_to_hf
from t2x.hf.write import architecture, write_hf

__all__ = ["BERT", "GPT2", "LLAMA", "WEIGHTS", "WEIGHTS_INDEX", "architecture", "import_hf", "read_hf",
           "sentencepiece_to_hf", "write_hf"]
