"""The ``t2x`` command: parse arguments, call the library, print results.

The result is one JSON line on standard output, and nothing else is: logs, progress
and whatever the runtime's libraries print go to standard error. In a multi-process job
process 0 prints the result. A process of a multi-process job that fails exits at once
(it does not wait for the others at shutdown), naming the lost process when a collective
failed because another process died.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
from typing import TextIO

EVAL_KEYS = {
    "loss": "mean negative log-likelihood per target token (nats; encoders: per masked token)",
    "perplexity": "exp(loss)",
    "bits_per_byte": "decoders: the same NLL in bits per byte of the text scored",
    "accuracy": "encoders: share of masked tokens predicted exactly",
    "tokens": "target tokens scored (encoders: masked tokens, drawn from objective.eval_seed)",
    "bytes": "decoders: bytes of text those tokens stand for (separators such as newlines included)",
    "documents": "decoders: documents whose last token was scored",
    "invalid_utf8, bad_records, corrupt_records, unreadable_files, oversized_documents": "input problems met",
    "batches": "batches evaluated",
    "step": "the checkpoint's step",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2x", description="Pretrain Transformer language models with JAX; evaluate, export, generate with and "
        "serve them."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, config_help, command_help, description in (
        ("train", "YAML config file (see configs/)", "train a model; rerunning the same command resumes it",
         "Train the model a config describes. Rerunning the same command resumes from the run "
        "directory's newest checkpoint that verifies (a damaged one is set aside, or with "
        "checkpoint.on_damage=stop, reported). Prints the final held-out evaluation as one JSON line (the keys "
        "of `t2x eval`). SIGTERM or Ctrl-C saves a checkpoint at the current step and exits 0 (JSON: "
        "preempted, step). In a multi-process job (TPU pod, SLURM, Open MPI, Kubernetes, or distributed.* "
        "settings) every process runs this same command and process 0 prints the result."),
        ("finetune", "YAML config file with a classify section (see docs/finetuning.md)",
         "fine-tune a pretrained model for text classification",
         "Train a classifier: the config's model (its family's, without the LM head) under a pooling "
        "and a dense head, on labelled examples (data.text_key and classify.label_key of JSONL, CSV or TSV files, "
        "or TFDS), with classify.labels the classes in order. train.init_from names the pretrained run or export "
        "to start from: its backbone parameters are taken, the optimizer starts fresh, and the parameters it does "
        "not use and the new ones are logged. Runs, resumes and stops like `t2x train`; prints the held-out "
        "loss, accuracy, macro_f1, per-class f1, confusion_matrix (rows: true label, columns: predicted), "
        "majority_accuracy (always answering the split's most common label), examples, truncated and batches "
        "as one JSON line."),
    ):
        command = commands.add_parser(name, help=command_help, description=description)
        command.add_argument("config", help=config_help)
        command.add_argument("overrides", nargs="*", metavar="key=value",
                             help="dotted config overrides, e.g. train.steps=100")

    bench = commands.add_parser(
        "bench", help="measure a config's train step: tokens/s, model FLOP/s, MFU, compile time, memory",
        description="Time the config's real jitted train step (its model, optimizer, shardings and donation) on "
        "synthetic rows its family packs from random tokens, after compiling it and --warmup untimed steps. Prints "
        "tokens_per_second, model_tflops_per_second_per_device (t2x/flops.py), mfu (against the device's tabulated "
        "bf16 peak, --peak-flops or train.peak_flops_per_device), step_seconds_median and _mean, compile_seconds, the "
        "last step's loss, and memory (device peak, the step's argument and temporary bytes, host peak RSS) as one "
        "JSON line; with --measure-peak also this machine's float32 matmul peak through XLA and the step's share of "
        "it. Needs no data; see docs/performance.md.")
    bench.add_argument("config", help="YAML config file (see configs/)")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    bench.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    bench.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per device for MFU")
    bench.add_argument("--measure-peak", action="store_true",
                       help="also measure the float32 matmul peak of this machine through XLA")

    keys = "; ".join(f"{k}: {v}" for k, v in EVAL_KEYS.items())
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on held-out text",
        description="Evaluate a checkpoint on the whole held-out split, or on other text with --text, and print "
        f"one JSON line with {keys}. Without --step: the newest checkpoint that verifies.",
    )
    evaluate.add_argument("target", metavar="RUN_DIR_OR_CONFIG", help="a run directory, or the config that made it")
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that verifies)")
    evaluate.add_argument(
        "--text", action="append", metavar="GLOB", default=None,
        help="evaluate on these text, JSONL or TFRecord files instead of the run's held-out split "
        "(format by suffix; data.text_key and data.text_unit apply); repeat for more globs",
    )
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    tokenizer = commands.add_parser("tokenizer", help="SentencePiece tokenizers")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    tok_train = tokenizer_commands.add_parser(
        "train",
        help="train a SentencePiece model",
        description="Train a SentencePiece model that keeps text exactly (whitespace, newlines, byte fallback). "
        "The same input gives the same model on any machine. Prints JSON: model, vocab_size.",
    )
    tok_train.add_argument(
        "--input", required=True, nargs="+", metavar="GLOB_OR_SOURCE",
        help="text, JSONL or TFRecord files (globs allowed), or 'builtin' for the built-in corpus's train split",
    )
    tok_train.add_argument("--vocab-size", type=int, required=True, help="number of pieces, specials included")
    tok_train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    tok_train.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    tok_train.add_argument("--text-key", default="text", help="text field of JSONL objects and tf.train.Examples")
    _inference_parsers(commands)
    return parser


MESH_HELP = "mesh.data=N, mesh.fsdp=N or mesh.tensor=N: spread the model or the batch over this machine's devices " \
    "(default: one device)"


def _inference_parsers(commands) -> None:
    export = commands.add_parser(
        "export",
        help="export a checkpoint's parameters for inference",
        description="Write a run's checkpoint (any mesh, any number of processes wrote it) as an export directory: "
        "model.safetensors (parameters only), config.yaml, the tokenizer and manifest.json (source run and "
        "step, dtype, parameter count, t2x version, SHA-256 of each file). Reading it back needs neither Orbax "
        "nor TensorFlow. --format hf writes a Hugging Face model directory instead, with tokenizer.json: "
        "GPT2LMHeadModel or LlamaForCausalLM for a decoder, BertForMaskedLM (BertForPreTraining with the "
        "next-sentence head) for an encoder, T5ForConditionalGeneration for an encoder-decoder; for a fine-tuned "
        "classifier BertForSequenceClassification (an encoder pooling cls) or GPT2ForSequenceClassification or "
        "LlamaForSequenceClassification (a decoder pooling last), its labels as id2label. A model none represents "
        "exactly is refused, naming the setting. Prints the "
        "manifest (or the Hugging Face config) as JSON, with the output path.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--output", required=True, metavar="DIR", help="a new or empty directory")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that verifies)")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="float32 keeps the trained values bit for bit; bfloat16 rounds them")
    export.add_argument("--format", choices=["t2x", "hf", "stablehlo"], default="t2x",
                        help="t2x: the export directory; hf: a Hugging Face model directory (transformers' "
                        "from_pretrained loads it); stablehlo: the export directory plus the model's logits, prefill "
                        "and decode functions serialized with jax.export (symbolic batch and length) and SERVING.md")
    export.add_argument("--platforms", default=None, metavar="P[,P...]",
                        help="with --format stablehlo: cpu, cuda, rocm and/or tpu (default: this machine's)")

    import_hf = commands.add_parser(
        "import-hf",
        help="import a Hugging Face GPT-2, Llama, BERT or T5 model, or a BERT, GPT-2 or Llama classifier, as an export",
        description="Write a local Hugging Face GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM, "
        "BertForPreTraining or T5ForConditionalGeneration directory, or a BertForSequenceClassification, "
        "GPT2ForSequenceClassification or LlamaForSequenceClassification one (a fine-tuned classifier, its "
        "classify.labels from id2label), with config.json, "
        "safetensors weights, tokenizer.json or tokenizer.model, as a t2x export directory, which every "
        "inference command, t2x eval and train.init_from accept. Options t2x cannot reproduce exactly are refused "
        "by name; pickled weights are never read. Prints the manifest as JSON, with the output path.",
    )
    import_hf.add_argument("hf_dir", metavar="HF_DIR")
    import_hf.add_argument("--output", required=True, metavar="DIR", help="a new or empty directory")
    import_hf.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                           help="parameter dtype of the export (default: the checkpoint's, float16 as float32)")

    def source(p):
        p.add_argument("source", metavar="EXPORT_OR_RUN", help="an export directory, or a run directory")
        p.add_argument("--step", type=int, default=None, help="a run directory's checkpoint step (default: newest)")
        p.add_argument("overrides", nargs="*", metavar="mesh.AXIS=N", help=MESH_HELP)

    generate = commands.add_parser(
        "generate",
        help="continue prompts with a decoder, or answer inputs with an encoder-decoder",
        description="Continue each prompt (a decoder), or write the output of each input (an encoder-decoder), "
        "decoding with a KV cache and up to --slots sequences at once. Greedy by default; --temperature > 0 "
        "samples (with --top-k, --top-p and --seed); --num-beams > 1 is beam search (encoder-decoders). A "
        "completion ends at the end-of-text token, at a --stop string (cut before it), at --max-new-tokens, or at "
        "the model's context. Prints JSON: completions, each with prompt, text, tokens, prompt_tokens and "
        "finish_reason (eos, stop, length).",
    )
    source(generate)
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for more")
    prompts.add_argument("--prompt-file", metavar="FILE",
                         help="one prompt per line (\\n for a newline), or JSON lines with a \"prompt\" field")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose "
                          "probabilities add up to P")
    generate.add_argument("--seed", type=int, default=0, help="random seed of the first sample (the n-th: seed+n)")
    generate.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string; repeat for more")
    generate.add_argument("--slots", type=int, default=None, help="sequences decoded at once (default: up to 32)")
    generate.add_argument("--num-beams", type=int, default=1, help="beam search with N hypotheses per input "
                          "(encoder-decoders; 1: greedy or sampled)")
    generate.add_argument("--length-penalty", type=float, default=0.6, help="beam search ranks finished outputs "
                          "by log-probability / ((5 + length) / 6) ** ALPHA")

    score = commands.add_parser(
        "score",
        help="log-likelihood, perplexity and bits per byte of each text in a file",
        description="Score each text of FILE (one per line, or JSON lines with a \"text\" field when FILE ends in "
        ".jsonl): log_likelihood (nats), tokens, bytes, perplexity and bits_per_byte, each token predicted from BOS "
        "and the tokens before it. Texts longer than --window are scored with a sliding window that advances by "
        "--stride tokens, each token scored once. Prints JSON: texts (one result each) and total.",
    )
    source(score)
    score.add_argument("file", metavar="FILE")
    score.add_argument("--window", type=int, default=None, help="tokens per window, BOS included (default: context)")
    score.add_argument("--stride", type=int, default=None, help="tokens a window advances (default: half a window)")
    score.add_argument("--eos", action="store_true", help="also score the end-of-text token after each text")
    score.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")

    embed = commands.add_parser(
        "embed",
        help="an embedding vector per text in a file",
        description="Embed each text of FILE (as for score) with a decoder or an encoder: the final hidden states "
        "of its tokens averaged (--pooling mean) or their elementwise maximum (--pooling max), a decoder's last "
        "token's (--pooling last) or an encoder's first, [CLS], token's (--pooling cls), optionally "
        "L2-normalized. Texts longer than the context are cut to its length. Writes OUT.npy ([texts, d_model] float32) or OUT.jsonl (one "
        "{\"embedding\": [...]} per text); prints JSON: output, texts, dim.",
    )
    source(embed)
    embed.add_argument("file", metavar="FILE")
    embed.add_argument("--output", required=True, metavar="OUT.npy|OUT.jsonl")
    embed.add_argument("--pooling", choices=["mean", "last", "cls", "max"], default="mean",
                       help="decoders: mean, last or max; encoders: cls, mean or max")
    embed.add_argument("--normalize", action="store_true", help="scale each vector to unit L2 norm")
    embed.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")

    serve = commands.add_parser(
        "serve",
        help="serve a model over HTTP",
        description="Serve generate, score and embed over HTTP (FastAPI on uvicorn): POST /v1/generate "
        "(\"stream\": true for server-sent events), POST /v1/score, POST /v1/embed, GET /v1/model, GET /healthz; "
        "the OpenAPI schema at /docs. Generation batches continuously over --slots decode slots; score and embed "
        "requests are batched as they arrive. Every shape compiles before the server listens.",
    )
    source(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--slots", type=int, default=8, help="sequences decoded at once")
    serve.add_argument("--max-batch", type=int, default=16, help="texts per score or embed batch")
    serve.add_argument("--max-new-tokens", type=int, default=512, help="largest max_new_tokens a request may ask")
    serve.add_argument("--max-texts", type=int, default=64, help="texts per score or embed request")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments, with ``key=value`` overrides accepted anywhere (after options too)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) < len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides or not hasattr(args, 'overrides'))}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def _configure_runtime() -> None:
    from t2x.hostmem import keep_freed_memory

    try:
        keep_freed_memory()  # first: before any thread that allocates step buffers exists
    except ValueError as e:
        raise SystemExit(f"t2x: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import absl.logging
    import jax

    from t2x.data.corpus import cache_dir

    absl.logging.set_verbosity(absl.logging.WARNING)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


def _tokenizer_train(args) -> dict:
    from t2x.data import corpus
    from t2x.data.sources import read_texts
    from t2x.data.tokenizer import load_tokenizer, train_tokenizer

    paths = [corpus.split_file("train") if p == "builtin" else p for p in args.input]
    path = train_tokenizer(read_texts(paths, text_key=args.text_key), args.vocab_size, args.output, args.model_type)
    return {"model": path, "vocab_size": load_tokenizer(path).vocab_size}


def _read_lines(path: str, what: str) -> list[str]:
    """A UTF-8 text file's lines; ``what`` names the argument in the error."""
    from t2x.infer.engine import RequestError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(what, f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _read_texts(path: str) -> list[str]:
    """Texts of a file: JSON lines with a "text" field (.jsonl), or one per line."""
    import json

    from t2x.infer.engine import RequestError

    lines = _read_lines(path, "FILE")
    if not path.endswith(".jsonl"):
        return [line for line in lines if line]
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            value = None
        if not isinstance(value, str):
            raise RequestError("FILE", f"{path} line {n} is not a JSON object with a \"text\" string")
        texts.append(value)
    return texts


def _generate(args) -> dict:
    from t2x.infer.engine import RequestError, generate, read_prompts
    from t2x.infer.model import load
    from t2x.infer.sampling import Sampling

    prompts = read_prompts(_read_lines(args.prompt_file, "prompt-file")) if args.prompt_file else args.prompt
    if args.num_samples < 1:
        raise RequestError("num-samples", f"must be >= 1, got {args.num_samples}")
    base = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop),
                    args.num_beams, args.length_penalty)
    model = load(args.source, args.step, args.overrides)
    settings = [dataclasses.replace(base, seed=args.seed + n) for _ in prompts for n in range(args.num_samples)]
    repeated = [p for p in prompts for _ in range(args.num_samples)]
    completions = generate(model, repeated, settings, slots=args.slots)
    return {"completions": [c.to_json() for c in completions]}


def _score(args) -> dict:
    import math

    from t2x.infer.model import load
    from t2x.infer.score import LN2, Scorer

    texts = _read_texts(args.file)
    model = load(args.source, args.step, args.overrides)
    scores = Scorer(model, args.batch_size, args.window, args.stride).score(texts, eos=args.eos)
    ll, tokens, size = sum(s.log_likelihood for s in scores), sum(s.tokens for s in scores), sum(s.bytes for s in scores)
    total = {"texts": len(scores), "log_likelihood": ll, "tokens": tokens, "bytes": size,
             "perplexity": math.exp(-ll / tokens) if tokens else None, "bits_per_byte": -ll / LN2 / size if size else None}
    return {"texts": [s.to_json() for s in scores], "total": total}


def _embed(args) -> dict:
    import json

    import numpy as np

    from t2x.infer.engine import RequestError
    from t2x.infer.model import load
    from t2x.infer.score import Scorer

    if not args.output.endswith((".npy", ".jsonl")):
        raise RequestError("output", f"{args.output} must end in .npy or .jsonl")
    texts = _read_texts(args.file)
    model = load(args.source, args.step, args.overrides)
    vectors = Scorer(model, args.batch_size).embed(texts, args.pooling, args.normalize)
    tmp = f"{args.output}.tmp-{os.getpid()}"
    try:
        if args.output.endswith(".npy"):
            with open(tmp, "wb") as f:
                np.save(f, vectors)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for v in vectors:
                    f.write(json.dumps({"embedding": [float(x) for x in v]}) + "\n")
        os.replace(tmp, args.output)
    except OSError as e:
        raise RequestError("output", f"cannot write {args.output}: {e.strerror or e}") from None
    return {"output": args.output, "texts": len(texts), "dim": int(vectors.shape[1])}


def _export(args) -> dict:
    from t2x.export import export_run

    platforms = tuple(p.strip() for p in args.platforms.split(",")) if args.platforms else None
    manifest = export_run(args.run_dir, args.output, args.step, args.dtype, args.format, platforms)
    return {"output": os.path.abspath(args.output), **manifest}


def _import_hf(args) -> dict:
    from t2x.hf import import_hf

    return {"output": os.path.abspath(args.output), **import_hf(args.hf_dir, args.output, args.dtype)}


def _serve(args) -> dict:
    from t2x.infer.engine import RequestError
    from t2x.infer.model import load
    from t2x.infer.server import Limits, serve

    limits = Limits(slots=args.slots, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                    max_texts=args.max_texts, max_body_bytes=args.max_body_bytes)
    for field, value in dataclasses.asdict(limits).items():
        if value <= 0 and field != "batch_wait_ms":
            raise RequestError(field.replace("_", "-"), f"must be positive, got {value}")
    model = load(args.source, args.step, args.overrides)
    serve(model, args.host, args.port, limits)
    return {"served": True}


INFERENCE = {"export": _export, "import-hf": _import_hf, "generate": _generate, "score": _score, "embed": _embed, "serve": _serve}


def _join_job(cfg) -> None:
    """Join the multi-process job, if any, before any JAX computation; then only
    process 0 logs progress."""
    import jax

    from t2x.parallel.distributed import initialize

    initialize(cfg.distributed)
    if jax.process_index() != 0:
        logging.getLogger("t2x").setLevel(logging.WARNING)


def _eval_overrides(args) -> list[str]:
    if not args.text:
        return args.overrides
    files = ",".join(f"'{pattern}'" for pattern in args.text)
    return ["data.source=files", f"data.eval_files=[{files}]", "data.format=auto", *args.overrides]


# Errors that mean bad input (a config, data, a checkpoint, a request): a message, exit 1.
USER_ERRORS = {
    "t2x.config": "ConfigError",
    "t2x.data.reader": "DataError",
    "t2x.data.tokenizer": "TokenizerError",
    "t2x.checkpoint": "CheckpointError",
    "t2x.train.loop": "NonFiniteError",
    "t2x.train.metrics": "MetricsError",
    "t2x.export": "ExportError",
    "t2x.infer.engine": "RequestError",
}


def _user_errors() -> tuple[type, ...]:
    """The user error types of the modules this command loaded (an error can only come
    from a loaded module; inference commands never load the training stack)."""
    return tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)


def _multi_process() -> bool:
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def _exit_now(code: int) -> None:
    """End a process of a multi-process job at once: after a failure, waiting for the
    others at shutdown would hang until a timeout and then abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report_failure(command: str, error: BaseException) -> None:
    """One message for an unexpected failure of a process of a multi-process job."""
    import jax

    from t2x.parallel.distributed import lost_processes

    me, lost = jax.process_index(), lost_processes(error)
    if lost:
        who = f"process {lost[0]}" if len(lost) == 1 else "one of processes " + ", ".join(map(str, lost))
        print(f"t2x {command}: error: process {me} lost contact with {who} of the job, which probably died or was "
              f"killed ({str(error).strip().splitlines()[0][:300]}); rerun every process to resume from the last "
              "checkpoint", file=sys.stderr, flush=True)
    else:
        traceback.print_exc()
        print(f"t2x {command}: error: process {me} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, result_stream: TextIO | None = None) -> int:
    """Run a ``t2x`` command.

    Args:
      argv: arguments (default ``sys.argv[1:]``).
      result_stream: where the result's JSON line goes (default standard output).

    Returns:
      The exit status: 0, or 1 with a message on standard error.
    """
    args = _parse(argv)
    _configure_runtime()
    from t2x.config import load_config
    from t2x.train.metrics import to_json

    try:
        if args.command in ("train", "finetune"):
            from t2x.config import ConfigError
            from t2x.train.loop import train

            cfg = load_config(args.config, args.overrides)
            if (args.command == "finetune") != cfg.classify.enabled:
                raise ConfigError("t2x finetune trains a classifier: set classify.labels" if args.command == "finetune"
                                  else "classify.labels makes this a classifier: run it with t2x finetune")
            _join_job(cfg)
            result = train(cfg)
        elif args.command == "eval":
            from t2x.evaluate import evaluate_checkpoint
            from t2x.rundir import load_run

            cfg, run_dir = load_run(args.target, _eval_overrides(args))
            _join_job(cfg)
            result = evaluate_checkpoint(cfg, run_dir, args.step)
        elif args.command == "bench":
            from t2x.bench import bench

            result = bench(load_config(args.config, args.overrides), args.steps, args.warmup, args.peak_flops,
                           args.measure_peak)
        elif args.command in INFERENCE:
            result = INFERENCE[args.command](args)
        else:
            result = _tokenizer_train(args)
    except KeyboardInterrupt:
        if _multi_process():
            _exit_now(130)
        raise
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"t2x {args.command}: error: {e}", file=sys.stderr, flush=True)
            if _multi_process():
                _exit_now(1)
            return 1
        if not _multi_process():
            raise
        _report_failure(args.command, e)
        _exit_now(1)
    if not _multi_process() or _is_process_zero():
        print(to_json(result), file=result_stream or sys.stdout, flush=True)
    if _multi_process():
        from t2x.parallel.distributed import finished

        finished()
    return 0


def _is_process_zero() -> bool:
    import jax

    return jax.process_index() == 0


def entry() -> int:
    """The console script: standard output carries the result (or ``--help``) alone.
    Once the arguments are read, file descriptor 1 is pointed at standard error, so that
    what libraries print there (Gloo's connection lines, say) stays off it, and the
    result goes to the original standard output."""
    _parse(None)  # --help and usage errors, before anything is redirected
    result = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        return main(result_stream=result)
    finally:
        result.flush()


if __name__ == "__main__":
    sys.exit(entry())
