"""Hugging Face format: decoders exported as ``GPT2LMHeadModel`` or ``LlamaForCausalLM``,
encoders as ``BertForMaskedLM`` and encoder-decoders as ``T5ForConditionalGeneration``,
fine-tuned classifiers as ``BertForSequenceClassification``,
``GPT2ForSequenceClassification`` or ``LlamaForSequenceClassification``, with their
tokenizer; such checkpoints imported as t2x exports. The mapping is exact or refused,
naming the option that prevents it.

``write`` and ``read`` are the two directions; ``decoder``, ``bert`` and ``t5`` map each
architecture's config and tensors, ``classify`` which classifiers map and their labels;
``tokenizer`` writes ``tokenizer.json`` (and makes an imported encoder-decoder's read as
t2x's); ``format`` holds what they share (file names, reading weights, taking tensors by
name).
"""

from t2x.hf.bert import MASKED_LM as BERT
from t2x.hf.decoder import GPT2, LLAMA
from t2x.hf.format import WEIGHTS, WEIGHTS_INDEX
from t2x.hf.read import import_hf, read_hf
from t2x.hf.t5 import ARCHITECTURE as T5
from t2x.hf.tokenizer import sentencepiece_to_hf
from t2x.hf.write import architecture, write_hf

__all__ = ["BERT", "GPT2", "LLAMA", "T5", "WEIGHTS", "WEIGHTS_INDEX", "architecture", "import_hf", "read_hf",
           "sentencepiece_to_hf", "write_hf"]
