"""The ``t2x`` command: parse arguments, call the library, print results.

The result is one JSON line on standard output, and nothing else is: logs, progress
and whatever the runtime's libraries print go to standard error. In a multi-process job
process 0 prints the result. A process of a multi-process job that fails exits at once
(it does not wait for the others at shutdown), naming the lost process when a collective
failed because another process died.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import TextIO

EVAL_KEYS = {
    "loss": "mean negative log-likelihood per target token (nats)",
    "perplexity": "exp(loss)",
    "bits_per_byte": "the same NLL in bits per byte of the text scored",
    "tokens": "target tokens scored",
    "bytes": "bytes of text those tokens stand for (separators such as newlines included)",
    "documents": "documents whose last token was scored",
    "invalid_utf8, bad_records, corrupt_records, unreadable_files, oversized_documents": "input problems met",
    "batches": "batches evaluated",
    "step": "the checkpoint's step",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2x", description="Pretrain Transformer language models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model; rerunning the same command resumes it",
        description="Train the model a config describes. Rerunning the same command resumes from the run "
        "directory's newest checkpoint that verifies (a damaged one is set aside, or with "
        "checkpoint.on_damage=stop, reported). Prints the final held-out evaluation as one JSON line (the keys "
        "of `t2x eval`). SIGTERM or Ctrl-C saves a checkpoint at the current step and exits 0 (JSON: "
        "preempted, step). In a multi-process job (TPU pod, SLURM, Open MPI, Kubernetes, or distributed.* "
        "settings) every process runs this same command and process 0 prints the result.",
    )
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.steps=100")

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
    return parser


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


def _eval_overrides(args) -> list[str]:
    if not args.text:
        return args.overrides
    files = ",".join(f"'{pattern}'" for pattern in args.text)
    return ["data.source=files", f"data.eval_files=[{files}]", "data.format=auto", *args.overrides]


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
    from t2x.checkpoint import CheckpointError
    from t2x.config import ConfigError, load_config
    from t2x.data.reader import DataError
    from t2x.data.tokenizer import TokenizerError
    from t2x.train.loop import NonFiniteError
    from t2x.train.metrics import MetricsError, to_json

    user_errors = (ConfigError, DataError, TokenizerError, CheckpointError, NonFiniteError, MetricsError)
    try:
        if args.command == "train":
            from t2x.train.loop import train

            cfg = load_config(args.config, args.overrides)
            _join_job(cfg)
            result = train(cfg)
        elif args.command == "eval":
            from t2x.evaluate import evaluate_checkpoint
            from t2x.rundir import load_run

            cfg, run_dir = load_run(args.target, _eval_overrides(args))
            _join_job(cfg)
            result = evaluate_checkpoint(cfg, run_dir, args.step)
        else:
            result = _tokenizer_train(args)
    except user_errors as e:
        print(f"t2x {args.command}: error: {e}", file=sys.stderr, flush=True)
        if _multi_process():
            _exit_now(1)
        return 1
    except KeyboardInterrupt:
        if _multi_process():
            _exit_now(130)
        raise
    except Exception as e:
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
