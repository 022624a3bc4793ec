"""t2x next to Hugging Face ``transformers``' PyTorch GPT-2 (and BERT, T5), training the same thing.

For each shape both train a GPT-2 (learned positions, LayerNorm, tanh-GELU, biases, tied
embeddings) from the same initial weights (t2x's, copied across with t2x's own
Hugging Face export mapping) on the same batches of whole-document rows, with the same
optimizer: AdamW with weight decay on matrices and embeddings, t2x's learning-rate
schedule step by step, gradients clipped to norm 1, float32 throughout (or, with
``--bfloat16``, t2x's ``model.dtype=bfloat16`` against the peer's forward pass under
``torch.autocast``: parameters, optimizer and loss float32 on both sides). The
``bert_small`` shape does the same with a BERT (``BertForMaskedLM``) trained by masked
LM: the peer reads the inputs and targets of t2x's own masks for each step; it runs its
masked-LM head at every position, as ``transformers`` does, and t2x at the chosen ones
(``objective.max_predictions``). ``t5_small`` trains a T5 (``T5ForConditionalGeneration``:
relative position buckets, RMSNorm, ReLU, no biases, tied embeddings) of the same shape
(6 encoder and 6 decoder layers) on span-corrupted rows, one piece of text a row, the
peer reading the same encoder inputs and decoder targets.

1. **Equal work**: ``--loss-steps`` steps of each on the same fixed batches; the losses
   after them must agree (``--loss-tolerance``), or the comparison stops there.
2. **Speed**: ``--rounds`` rounds, each timing ``--steps`` steps of t2x then of PyTorch,
   so both meet the machine in the same state; the median step time of each gives
   tokens/s and the ratio.
3. **The limit**: this machine's float32 matrix-multiply peak through XLA and through
   PyTorch (best of repeated 2048^3 products), and each one's achieved model FLOP/s
   (``t2x/flops.py``'s count for both) as a fraction of its own library's peak.
4. With ``--profile``, **the ceiling**: t2x's step traced after the rounds and divided
   among the parts of the model (``benchmarks/cpu_profile.py``); the large products'
   time (MLP, attention projections, vocabulary projection) is the least a step could
   take with XLA's products as they run in it, so the peer's step over it is the ratio
   t2x would reach were everything else (attention, loss, norms, optimizer) free.

Needs ``torch`` (CPU build: ``pip install torch==2.13.0``) and ``transformers``.

    python benchmarks/peers.py                       # both GPT-2 shapes
    python benchmarks/peers.py --shapes bert_small   # BERT, masked LM
    python benchmarks/peers.py --shapes t5_small     # T5, span corruption
    python benchmarks/peers.py --shapes small --rounds 5
    python benchmarks/peers.py --t2x model.scan_layers=false   # t2x with other settings
    python benchmarks/peers.py --peer-malloc keep    # the peer with t2x's allocator setting
    python benchmarks/peers.py --shapes small --bfloat16 --loss-tolerance 2e-2
    python benchmarks/peers.py --shapes small --profile   # and the ceiling its products set

t2x's process keeps freed memory for reuse, as ``t2x``'s command line does on a CPU
(``t2x.hostmem``); the peer runs with glibc's defaults unless ``--peer-malloc keep``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import jax
import numpy as np

from t2x import hostmem
from t2x.bench import StepBench, matmul_peak_flops
from t2x.config import load_config
from t2x.data.tokenizer import load_tokenizer
from t2x.hf import bert as hf_bert
from t2x.hf import decoder as hf_decoder
from t2x.hf import t5 as hf_t5
from t2x.models.transformer import loop_left
from t2x.train.state import make_optimizer

REPO = Path(__file__).resolve().parents[1]

SMALL = ["model.num_layers=6", "model.d_model=384", "model.num_heads=6", "model.d_ff=1536", "model.vocab_size=8192",
         "model.max_seq_len=256", "data.seq_len=256", "train.global_batch_size=8", "data.tokenizer=builtin:4096"]
SHAPES = {  # name: (config, overrides)
    # 6 layers, d_model 384, 6 heads, seq 256, batch 8, vocabulary 8192.
    "small": ("gpt2_small.yaml", SMALL),
    # GPT-2 small (124M) at seq 512, batch 4.
    "gpt2_small": ("gpt2_small.yaml", ["model.max_seq_len=512", "data.seq_len=512", "train.global_batch_size=4",
                                       "data.tokenizer=builtin:4096"]),
    # BERT (post-norm, exact GELU, token types) of the small shape, masked LM.
    "bert_small": ("bert_base.yaml", SMALL),
    # T5 (relative positions, RMSNorm, ReLU) of the small shape, 6 + 6 layers, span corruption.
    "t5_small": ("t5_small.yaml", [*SMALL, "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.1",
                                   "optim.decay=cosine"]),
}
GPT2_SHAPES = ["small", "gpt2_small"]
COMMON = ["model.dtype=float32", "model.remat=none", "model.dropout=0.0", "train.z_loss=0.0", "mesh.data=1",
          "data.num_shards=1", "optim.warmup_steps=10", "train.steps=10000", "optim.clip_norm=1.0"]


def whole_document_rows(rows: int, seq_len: int, vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of random tokens, each one whole document (what GPT-2 in transformers reads
    without segment masks)."""
    return {
        "tokens": rng.integers(4, vocab_size, (rows, seq_len), dtype=np.int32),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "num_bytes": np.zeros((rows,), np.int32),
    }


def span_corrupted_rows(cfg, tokenizer, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Encoder-decoder rows of span-corrupted random text, each row one piece (what T5 in
    transformers reads without segment masks), by t2x's own corruption and packer."""
    from t2x.families import span_corruption, task

    low = max(tokenizer.bos_id, tokenizer.eos_id, 3) + 1
    length = span_corruption(cfg, tokenizer).raw_length
    documents = [rng.integers(low, cfg.model.vocab_size, length).tolist() for _ in range(rows)]
    packed = task(cfg).rows(cfg, tokenizer).pack(documents, [np.ones(length, np.int64)] * rows, cfg.data.seq_len,
                                                 tokenizer, rng)
    if len(packed["segment_ids"]) != rows or packed["segment_ids"].max() != 1:
        raise RuntimeError("span corruption did not give one piece a row")
    return {name: np.asarray(value, np.int32) for name, value in packed.items()}


class TorchPeer:
    """``transformers``' GPT2LMHeadModel (``family`` decoder), BertForMaskedLM (encoder)
    or T5ForConditionalGeneration (encoder_decoder) with given weights (``tensors``, named
    as in transformers), trained as t2x trains: learning rate ``lrs[step]``, step i on
    ``batches[i % len(batches)]``, each ``(the model's inputs, labels)`` with -100 where
    nothing is predicted."""

    def __init__(self, family: str, hf: dict, tensors: dict, optim: dict, lrs: list[float], batches,
                 autocast: str | None = None):
        import torch
        from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, T5Config,
                                  T5ForConditionalGeneration)

        self.torch = torch
        settings = {k: v for k, v in hf.items() if k not in ("dtype", "torch_dtype")}
        if family == "decoder":
            self.model, tied = GPT2LMHeadModel(GPT2Config(**settings)), ("lm_head.weight",)
        elif family == "encoder_decoder":
            self.model, tied = T5ForConditionalGeneration(T5Config(**settings)), (
                "lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        else:
            self.model, tied = BertForMaskedLM(BertConfig(**settings)), ("cls.predictions.decoder.weight",
                                                                           "cls.predictions.decoder.bias")
        state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k not in tied and not k.endswith(("attn.bias", "position_ids"))]:
            raise RuntimeError(f"weights do not match {type(self.model).__name__}: missing {missing}, "
                               f"unexpected {unexpected}")
        self.model.train()
        named = list(self.model.named_parameters())
        groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": optim["weight_decay"]},
                  {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(optim["b1"], optim["b2"]), eps=optim["eps"],
                                           foreach=True)
        self.clip, self.lrs, self.step_count = optim["clip_norm"], lrs, 0
        self.autocast = autocast  # a dtype name: the forward pass under torch.autocast
        self.batches = [({k: torch.from_numpy(x.astype(np.int64)) for k, x in inputs.items()},
                         torch.from_numpy(labels.astype(np.int64))) for inputs, labels in batches]

    def run(self, steps: int) -> list[float]:
        torch, times, vocab = self.torch, [], self.model.config.vocab_size
        for _ in range(steps):
            t0 = time.perf_counter()
            inputs, labels = self.batches[self.step_count % len(self.batches)]
            for group in self.optimizer.param_groups:
                group["lr"] = self.lrs[self.step_count]
            casting = torch.autocast("cpu", dtype=getattr(torch, self.autocast)) if self.autocast else nullcontext()
            with casting:
                logits = self.model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), labels.view(-1),
                                                     ignore_index=-100)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.step_count += 1
            self.last_loss = loss.item()
            times.append(time.perf_counter() - t0)
        return times


def peer_batches(cfg, rows: list[dict], tokenizer, steps: int) -> list[tuple[dict, np.ndarray]]:
    """The peer's (inputs, labels) for steps 0 .. ``steps`` - 1 on ``rows`` in turn: a
    decoder's BOS then each token's predecessor, predicting every token (t2x's causal LM
    on whole rows); an encoder-decoder's input row (its padding masked) and BOS then each
    target's predecessor, predicting the row's targets; an encoder's inputs and targets
    from t2x's own masked-LM objective with the key of that step, -100 at the positions
    it does not predict."""

    def after_bos(tokens):
        return np.concatenate([np.full_like(tokens[:, :1], tokenizer.bos_id), tokens[:, :-1]], 1)

    if cfg.model.family == "decoder":
        return [({"input_ids": after_bos(r["tokens"])}, r["tokens"]) for r in rows]
    if cfg.model.family == "encoder_decoder":
        return [({"input_ids": r["tokens"], "attention_mask": r["segment_ids"] > 0,
                  "decoder_input_ids": after_bos(r["targets"])},
                 np.where(r["target_segment_ids"] > 0, r["targets"], -100)) for r in rows]
    from t2x.families import data_key, task

    objective = jax.jit(task(cfg).objective(cfg, tokenizer))
    out = []
    for step in range(steps):
        example = jax.device_get(objective(rows[step % len(rows)], data_key(cfg.train.seed, step)))
        labels = np.full(example["model"]["tokens"].shape, -100, np.int64)
        at, predicted = example["model"].get("predict_at"), example["weights"] > 0
        if at is None:
            labels[predicted] = example["targets"][predicted]
        else:
            np.put_along_axis(labels, at, np.where(predicted, example["targets"], -100), axis=1)
        out.append(({"input_ids": example["model"]["tokens"]}, labels))
    return out


def _torch_worker(conn, keep_memory: bool, *args) -> None:
    """The peer in a process of its own (so neither library's threads wait, spinning, on
    the other's turn): builds ``TorchPeer(*args)``, then runs steps on request.
    ``keep_memory``: glibc keeps freed memory as in t2x's process (``t2x.hostmem``);
    otherwise the peer runs with the allocator as its users get it."""
    if keep_memory:
        hostmem.keep_freed_memory("keep")
    peer = TorchPeer(*args)
    conn.send(sum(p.numel() for p in peer.model.parameters()))
    while (steps := conn.recv()) is not None:
        conn.send((peer.run(steps), peer.last_loss))


def torch_matmul_peak(size: int = 2048, seconds: float = 2.0, dtype: str = "float32") -> float:
    """FLOP/s of PyTorch's ``dtype`` ``size``-square matrix multiply, best of repeats."""
    import torch

    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.matmul(a, b)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def _torch_facts(dtype: str) -> tuple[float, str, int]:
    import torch

    return torch_matmul_peak(dtype=dtype), torch.__version__, torch.get_num_threads()


def compare(shape: str, args, peaks: dict) -> dict:
    config, overrides = SHAPES[shape]
    cfg = load_config(REPO / "configs" / config, [*overrides, *COMMON, f"model.dtype={args.dtype}", *args.t2x])
    m, batch, seq = cfg.model, cfg.train.global_batch_size, cfg.data.seq_len
    if args.profile and loop_left(m):
        raise SystemExit("peers.py --profile: model.scan_unroll leaves the layers in an XLA while loop, whose kernels "
                         "the profile does not attribute")
    rng = np.random.default_rng(0)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if m.family == "encoder_decoder":
        rows = [span_corrupted_rows(cfg, tokenizer, batch, rng) for _ in range(4)]
    else:
        rows = [whole_document_rows(batch, seq, m.vocab_size, rng) for _ in range(4)]
    ours = StepBench(cfg, devices=jax.devices()[:1], rows=rows)
    params = jax.tree.map(np.asarray, jax.device_get(ours.state.params))
    _, schedule = make_optimizer(cfg)
    total = args.loss_steps + args.rounds * args.steps
    lrs = [float(v) for v in jax.device_get(jax.vmap(schedule)(np.arange(total)))]
    o = cfg.optim
    optim = {"weight_decay": o.weight_decay, "b1": o.b1, "b2": o.b2, "eps": o.eps, "clip_norm": o.clip_norm}
    specials = {"bos_token": ours.bos_id, "eos_token": ours.bos_id}
    if m.family == "decoder":
        hf, weights = hf_decoder.hf_config(m, hf_decoder.GPT2, "float32", specials), hf_decoder.tensors(
            m, hf_decoder.GPT2, params)
    elif m.family == "encoder_decoder":
        hf, weights = hf_t5.hf_config(m, "float32", specials), hf_t5.tensors(m, params)
    else:
        hf, weights = hf_bert.hf_config(m, hf_bert.MASKED_LM, "float32", specials), hf_bert.tensors(m, params)
    conn, theirs = multiprocessing.get_context("spawn").Pipe()
    worker = multiprocessing.get_context("spawn").Process(
        target=_torch_worker, daemon=True,
        args=(theirs, args.peer_malloc == "keep", m.family, hf, weights, optim, lrs,
              peer_batches(cfg, rows, tokenizer, args.loss_steps), args.dtype if args.bfloat16 else None))
    worker.start()
    peer_params = conn.recv()

    def peer_run(steps):
        conn.send(steps)
        return conn.recv()

    try:
        ours.run(args.loss_steps)
        _, loss_torch = peer_run(args.loss_steps)
        loss_t2x = ours.last_metrics["loss"]
        same = abs(loss_t2x - loss_torch) <= args.loss_tolerance
        result = {"shape": shape, "t2x_settings": args.t2x, "dtype": m.dtype, "params": peer_params, "batch": batch, "seq_len": seq,
                  "target_len": ours.target_len, "vocab_size": m.vocab_size, "loss_steps": args.loss_steps,
                  "loss_t2x": loss_t2x, "loss_torch": loss_torch, "same_loss": same, "peer_malloc": args.peer_malloc}
        if not same:
            return result
        ours_times, peer_times = [], []
        for _ in range(args.rounds):
            ours_times += ours.run(args.steps)
            peer_times += peer_run(args.steps)[0]
    finally:
        conn.send(None)
        worker.join(timeout=60)
    flops = ours.flops_per_step  # the model's FLOPs, for both (the peer's BERT head at every position: more)
    t2x_s, torch_s = statistics.median(ours_times), statistics.median(peer_times)
    if args.profile:
        result |= ceiling(ours, t2x_s, torch_s, peaks["xla_matmul_flops"])
    return {**result,
            "t2x_step_seconds": t2x_s, "torch_step_seconds": torch_s,
            "t2x_tokens_per_second": batch * seq / t2x_s, "torch_tokens_per_second": batch * seq / torch_s,
            "ratio": torch_s / t2x_s,
            "t2x_model_tflops": flops / t2x_s / 1e12, "torch_model_tflops": flops / torch_s / 1e12,
            "t2x_of_xla_peak": flops / t2x_s / peaks["xla_matmul_flops"],
            "torch_of_torch_peak": flops / torch_s / peaks["torch_matmul_flops"],
            "t2x_compile_seconds": ours.compile_seconds}


def ceiling(ours: StepBench, t2x_step_seconds: float, torch_step_seconds: float, xla_peak_flops: float,
            steps: int = 2) -> dict:
    """``ours``'s step traced and divided by part (``cpu_profile.trace_parts``); the large
    products' seconds, their rate against XLA's peak, and the peer's step over them: as
    traced, and with the products' seconds scaled by the untraced step over the traced one
    (the tracer's overhead taken off them as off the whole step)."""
    import cpu_profile

    traced = cpu_profile.trace_parts(ours, steps)
    parts = traced["parts"]
    products_s = sum(parts[p]["ms"] for p in cpu_profile.PRODUCTS) / 1e3
    products_flops = sum(parts[p]["gflop"] for p in cpu_profile.PRODUCTS) * 1e9
    untraced = min(1.0, t2x_step_seconds / statistics.median(traced["step_seconds"]))
    return {"t2x_traced_step_seconds": traced["step_seconds"],
            "t2x_parts_ms": {p: round(v["ms"], 1) for p, v in parts.items()},
            "t2x_products_seconds": products_s, "t2x_products_of_xla_peak": products_flops / products_s / xla_peak_flops,
            "ceiling_ratio": torch_step_seconds / products_s,
            "ceiling_ratio_untraced": torch_step_seconds / (products_s * untraced)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=GPT2_SHAPES)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each per round")
    parser.add_argument("--loss-steps", type=int, default=30, help="steps before the losses are compared")
    parser.add_argument("--loss-tolerance", type=float, default=2e-3)
    parser.add_argument("--t2x", nargs="*", default=[], metavar="key=value",
                        help="t2x settings on top of the shape (model.* settings the peer does not share are refused by "
                        "the loss check)")
    parser.add_argument("--bfloat16", action="store_true",
                        help="t2x with model.dtype=bfloat16, the peer's forward pass under torch.autocast(bfloat16); "
                        "the matmul peaks are then bfloat16's (products accumulated in float32)")
    parser.add_argument("--profile", action="store_true",
                        help="also trace t2x's step by part of the model (benchmarks/cpu_profile.py) and print the "
                        "ratio t2x would reach were everything but its large products free")
    parser.add_argument("--peer-malloc", choices=["system", "keep"], default="system",
                        help="the peer's allocator: glibc as its users get it, or keeping freed memory as t2x does "
                        "(t2x.hostmem)")
    args = parser.parse_args(argv)
    hostmem.keep_freed_memory()  # as t2x's command line does

    args.dtype = dtype = "bfloat16" if args.bfloat16 else "float32"
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # torch apart from XLA here too
        torch_peak, torch_version, torch_threads = pool.apply(_torch_facts, (dtype,))
    peaks = {"xla_matmul_flops": matmul_peak_flops(dtype=getattr(jax.numpy, dtype)), "torch_matmul_flops": torch_peak}
    machine = {"jax": jax.__version__, "torch": torch_version, "torch_threads": torch_threads,
               "device": jax.devices()[0].device_kind, "matmul_dtype": dtype,
               "xla_matmul_tflops": peaks["xla_matmul_flops"] / 1e12,
               "torch_matmul_tflops": peaks["torch_matmul_flops"] / 1e12}
    print(json.dumps(machine), flush=True)
    results = []
    for shape in args.shapes:
        r = compare(shape, args, peaks)
        results.append(r)
        print(json.dumps(r), flush=True)
        if not r["same_loss"]:
            print(f"{shape}: losses after {args.loss_steps} steps differ (t2x {r['loss_t2x']:.5f}, torch "
                  f"{r['loss_torch']:.5f}): not the same work, no timing", file=sys.stderr)
    for r in results:
        if r["same_loss"]:
            print(f"{r['shape']:>10}: t2x {r['t2x_tokens_per_second']:,.0f} tok/s, transformers "
                  f"{r['torch_tokens_per_second']:,.0f} tok/s, ratio {r['ratio']:.2f}x; t2x at "
                  f"{r['t2x_of_xla_peak']:.0%} of XLA's matmul peak, transformers at {r['torch_of_torch_peak']:.0%} "
                  f"of torch's; loss after {r['loss_steps']} steps {r['loss_t2x']:.4f} vs {r['loss_torch']:.4f}")
            if "ceiling_ratio" in r:
                print(f"{'':>10}  t2x's large products alone {r['t2x_products_seconds']:.3f} s a step (at "
                      f"{r['t2x_products_of_xla_peak']:.0%} of XLA's peak) against transformers' whole step "
                      f"{r['torch_step_seconds']:.3f} s: ceiling {r['ceiling_ratio']:.2f}x "
                      f"({r['ceiling_ratio_untraced']:.2f}x with the tracer's overhead taken off)")
    return results


if __name__ == "__main__":
    sys.exit(0 if all(r["same_loss"] for r in main()) else 1)
