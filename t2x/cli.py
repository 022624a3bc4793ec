"""The ``t2x`` command: parse arguments, call the library, print results."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2x", description="Pretrain Transformer language models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model; rerunning the same command resumes it",
        description="Train the model a config describes. Rerunning the same command resumes from the run "
        "directory's latest checkpoint. Prints the final held-out evaluation as one JSON line. SIGTERM or "
        "Ctrl-C saves a checkpoint at the current step and exits 0 (JSON: preempted, step). In a multi-process "
        "job (TPU pod, SLURM, Open MPI, or distributed.* settings) every process runs this same command.",
    )
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.steps=100")

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on the held-out split",
        description="Evaluate a checkpoint on the whole held-out split and print one JSON line with loss, "
        "perplexity, bits_per_byte, tokens, bytes and step.",
    )
    evaluate.add_argument("target", metavar="RUN_DIR_OR_CONFIG", help="a run directory, or the config that made it")
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    tokenizer = commands.add_parser("tokenizer", help="SentencePiece tokenizers")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    tok_train = tokenizer_commands.add_parser(
        "train",
        help="train a SentencePiece model",
        description="Train a SentencePiece model that keeps text exactly (whitespace, newlines, byte fallback).",
    )
    tok_train.add_argument(
        "--input", required=True, nargs="+", metavar="GLOB_OR_SOURCE",
        help="text, JSONL or TFRecord files (globs allowed), or 'builtin' for the built-in corpus's train split",
    )
    tok_train.add_argument("--vocab-size", type=int, required=True, help="number of pieces, specials included")
    tok_train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    tok_train.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    tok_train.add_argument("--text-key", default="text", help="text field of JSONL objects and tf.train.Examples")
    return parser


def _configure_runtime() -> None:
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


def _join_job(cfg) -> None:
    """Join the multi-process job, if any, before any JAX computation; then only
    process 0 logs progress."""
    import jax

    from t2x.parallel.distributed import initialize

    initialize(cfg.distributed)
    if jax.process_index() != 0:
        logging.getLogger("t2x").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``t2x`` console script."""
    args = _parser().parse_args(argv)
    _configure_runtime()
    from t2x.checkpoint import CheckpointError
    from t2x.config import ConfigError, load_config
    from t2x.data.sources import DataError
    from t2x.data.tokenizer import TokenizerError
    from t2x.train.loop import NonFiniteError

    try:
        if args.command == "train":
            from t2x.train.loop import train

            cfg = load_config(args.config, args.overrides)
            _join_job(cfg)
            result = train(cfg)
        elif args.command == "eval":
            from t2x.evaluate import evaluate_checkpoint
            from t2x.rundir import load_run

            cfg, run_dir = load_run(args.target, args.overrides)
            _join_job(cfg)
            result = evaluate_checkpoint(cfg, run_dir, args.step)
        else:
            result = _tokenizer_train(args)
    except (ConfigError, DataError, TokenizerError, CheckpointError, NonFiniteError) as e:
        print(f"t2x {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
