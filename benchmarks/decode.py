"""Decoding speed: t2x's KV-cache engine next to Hugging Face ``generate``, in one run.

For a config's model shape (random weights: speed does not depend on them), measures
greedy decoding of ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt at each
batch size: time to the first token (prefill and one sample) and decode tokens/s (new
tokens of all sequences over the time after the first). Then the same with
``transformers``' ``generate`` (CPU torch, KV cache on) on the Hugging Face export of the
same weights (``GPT2LMHeadModel`` or ``LlamaForCausalLM``), alternating the two
``--repeats`` times and reporting medians.

    python benchmarks/decode.py configs/tiny.yaml
    python benchmarks/decode.py configs/gpt2_small.yaml --batch 1 32 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from t2x.config import load_config
from t2x.data.tokenizer import Tokenizer
from t2x.export import Exported
from t2x.infer.engine import Engine
from t2x.infer.model import place
from t2x.infer.sampling import Sampling
from t2x.models import build_model


def _tokenizer(vocab_size: int) -> Tokenizer:
    """A SentencePiece model for prompts (its pieces need not match the vocabulary)."""
    from t2x.data.tokenizer import load_tokenizer

    return load_tokenizer(f"builtin:{min(vocab_size, 4096)}")


def t2x_decode(engine: Engine, prompt: list[int], new_tokens: int) -> dict:
    sampling = Sampling(max_new_tokens=new_tokens)
    requests = []
    for _ in range(engine.slots):
        r = engine.encode("", sampling)
        r.ids = list(prompt)
        requests.append(r)
    start = time.perf_counter()
    engine.add_many(requests)  # prefilled together, as generate and the server do
    first = time.perf_counter()
    while engine.busy():
        engine.step()
    end = time.perf_counter()
    decoded = sum(max(len(r.generated) - 1, 0) for r in requests)  # after each first token
    return {"ttft_s": first - start, "decode_tokens_per_s": decoded / (end - first) if decoded else None}


def hf_decode(hf, batch: int, prompt: list[int], new_tokens: int) -> dict:
    import torch

    ids = torch.tensor([prompt] * batch)
    with torch.no_grad():
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, use_cache=True)
        first = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        end = time.perf_counter()
    rest = (end - first) - (first - start)  # the full run, less its prefill and first token
    return {"ttft_s": first - start, "decode_tokens_per_s": batch * (new_tokens - 1) / rest if rest > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="t2x only")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    module = build_model(cfg.model)
    params = nn.unbox(module.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    tokenizer = _tokenizer(cfg.model.vocab_size)
    model = place(Exported(cfg, jax.device_get(params), tokenizer.files, {"kind": "random", "path": args.config}))
    prompt = [tokenizer.bos_id] + list(np.random.default_rng(0).integers(4, tokenizer.vocab_size, args.prompt_tokens - 1))
    hf = None
    if not args.no_hf:
        import tempfile

        from transformers import AutoModelForCausalLM

        from t2x.hf import write_hf

        with tempfile.TemporaryDirectory() as tmp:
            write_hf(f"{tmp}/hf", Exported(cfg, jax.device_get(params), tokenizer.files, {"kind": "random"}))
            hf = AutoModelForCausalLM.from_pretrained(f"{tmp}/hf").eval()
    rows = []
    for batch in args.batch:
        engine = Engine(model, batch)
        engine.warm_up()  # compile
        if hf is not None:
            hf_decode(hf, batch, prompt, 4)
        runs = {"t2x": [], "hf": []}
        for _ in range(args.repeats):
            runs["t2x"].append(t2x_decode(engine, prompt, args.new_tokens))
            if hf is not None:
                runs["hf"].append(hf_decode(hf, batch, prompt, args.new_tokens))
        row = {"batch": batch}
        for name, results in runs.items():
            if results:
                row[name] = {k: statistics.median(r[k] for r in results) for k in results[0]}
        if hf is not None:
            row["decode_ratio_t2x_over_hf"] = row["t2x"]["decode_tokens_per_s"] / row["hf"]["decode_tokens_per_s"]
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"config": args.config, "overrides": args.overrides, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "devices": str(jax.devices()[0].device_kind), "rows": rows}))


if __name__ == "__main__":
    main()
