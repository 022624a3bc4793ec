"""The training loop: validate, resume or initialize, step, log, evaluate, checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from t2x.checkpoint import Checkpointer, check_data_state
from t2x.components import build
from t2x.config import Config, DistributedConfig, to_dict, to_yaml
from t2x.data.pipeline import TrainBatches, check_data, positions_to_state, state_to_positions
from t2x.data.sources import Source
from t2x.evaluate import Evaluator
from t2x.flops import peak_flops_per_device, training_flops_per_step
from t2x.parallel import host_to_global, process_row_range, sharding_context
from t2x.rundir import CHECKPOINTS, check_writable, write_run_files
from t2x.train.metrics import MetricsWriter
from t2x.train.preemption import StopRequest
from t2x.train.state import count_params, init_state, make_optimizer, state_shardings
from t2x.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss, gradient or parameters became NaN or infinite; nothing from that step was saved."""


def _data_meta(cfg: Config, source: Source, tokenizer) -> dict[str, Any]:
    """What the input pipeline's stored positions mean; a resume must match all of it."""
    d = cfg.data
    return {
        "training data": source.fingerprint,  # files (names, sizes), format and text field, or the TFDS split
        "data.tokenizer": hashlib.sha256(tokenizer.model_proto).hexdigest()[:16],
        "data.num_shards": d.num_shards,
        "data.seq_len": d.seq_len,
        "data.block_docs": d.block_docs,
        "data.doc_shuffle_buffer": d.doc_shuffle_buffer,
        "data.shuffle": d.shuffle,
        "data.invalid_utf8": d.invalid_utf8,
        "train.seed": cfg.train.seed,
    }


def _gather_positions(positions, num_shards: int) -> np.ndarray:
    """Every shard's position, from the processes that read it ([num_shards, 3])."""
    state = positions_to_state(positions, num_shards)
    if jax.process_count() > 1:
        state = np.max(multihost_utils.process_allgather(state), axis=0)
    return state


class _Window:
    """Train metrics between two log points, and the wall time they took."""

    def __init__(self):
        self.pending: list[tuple[int, Any]] = []  # (step, metrics still on device)
        self.fetched: list[tuple[int, dict]] = []  # (step, metrics on host, checked finite)
        self.start = time.perf_counter()
        self.timed_steps = 0

    def restart_clock(self):
        self.start = time.perf_counter()
        self.timed_steps = 0


def train(cfg: Config, devices=None) -> dict[str, Any]:
    """Train ``cfg`` (resuming from its run directory's latest checkpoint) and evaluate.

    The config, mesh, tokenizer, data and run directory are all checked before any
    checkpoint is read or written, and the run's files are rewritten only once the
    checkpoint it resumes from has been accepted.

    SIGTERM (or Ctrl-C) stops the run at a step every process agrees on, after saving it;
    rerunning resumes.

    Returns:
      The final held-out evaluation (loss, perplexity, bits_per_byte, tokens, bytes,
      step), or ``{"preempted": True, "step": N}`` when stopped early.
    """
    if jax.process_count() > 1:  # every process must run the same config (its process id aside)
        shared = to_yaml(dataclasses.replace(cfg, distributed=DistributedConfig()))
        digest = np.frombuffer(hashlib.sha256(shared.encode()).digest()[:8], np.int32)
        multihost_utils.assert_equal(digest, "the processes of this job were started with different configs")
    s = build(cfg, devices=devices)
    train_source = Source(cfg.data, "train")
    check_data(train_source, cfg.data, every_shard=True)
    if jax.process_count() > 1 and 0 < len(train_source.files) < cfg.data.num_shards:
        log.warning(
            "%s has fewer files than data.num_shards (%d): every process reads all of them and keeps its "
            "shards' records; split the data into at least %d files so each process reads only its own",
            train_source.description, cfg.data.num_shards, cfg.data.num_shards,
        )
    tx, schedule = make_optimizer(cfg)
    primary = jax.process_index() == 0
    batch_size, seq_len = cfg.train.global_batch_size, cfg.data.seq_len
    data_meta = _data_meta(cfg, train_source, s.tokenizer)
    with sharding_context(s.mesh):
        abstract, shardings = state_shardings(s.model, tx, s.mesh, seq_len)
        evaluator = Evaluator(cfg, s.tokenizer, s.model, s.mesh, shardings.params)
        run_dir = check_writable(cfg)
        checkpointer = Checkpointer(os.path.join(run_dir, CHECKPOINTS), cfg.checkpoint)
        try:
            latest = checkpointer.latest_step()
            if latest is None:
                state = init_state(s.model, tx, shardings, cfg.train.seed, seq_len)
                positions = None
                log.info("initialized %s parameters", f"{count_params(state.params):,}")
            else:
                check_data_state(checkpointer.data_state(latest), data_meta)  # before the (large) restore
                state, data_state = checkpointer.restore(latest, abstract, shardings)
                positions = state_to_positions(data_state["shards"])
                log.info("resumed %s from step %d", run_dir, latest)
            if primary:
                write_run_files(run_dir, cfg, s.tokenizer.model_proto)
            batches = TrainBatches(
                train_source, s.tokenizer, cfg.data, batch_size, cfg.train.seed,
                process_row_range(s.mesh, batch_size), positions,
            )
            step = jit_train_step(make_train_step(s.model, tx, schedule, cfg, s.tokenizer.bos_id), shardings, s.mesh)
            writer = MetricsWriter(run_dir, enabled=primary)
            if latest is not None:  # later records of steps after `latest` supersede earlier ones
                writer.write("resume", latest, {})
            stop = StopRequest()
            try:
                return _loop(cfg, s, state, batches, step, evaluator, checkpointer, writer, data_meta, primary, stop)
            finally:
                stop.close()
                writer.close()
                batches.close()
        finally:
            checkpointer.close()


def _loop(cfg, s, state, batches, train_step, evaluator, checkpointer, writer, data_meta, primary, stop):
    steps, batch_size, seq_len = cfg.train.steps, cfg.train.global_batch_size, cfg.data.seq_len
    flops_per_step = training_flops_per_step(cfg.model, batch_size, seq_len)
    peak = peak_flops_per_device(jax.devices()[0].device_kind, cfg.train.peak_flops_per_device)
    first = int(jax.device_get(state.step))
    window = _Window()
    bar = tqdm(total=steps, initial=min(first, steps), unit="step", dynamic_ncols=True,
               disable=not (primary and cfg.train.progress_bar))

    def flush() -> None:
        """Fetch pending metrics; stop at a non-finite step unless its update was skipped."""
        values = jax.device_get([m for _, m in window.pending])
        fetched = list(zip([n for n, _ in window.pending], values))
        window.pending.clear()
        window.fetched.extend(fetched)
        for n, m in fetched:
            if m["finite"]:
                continue
            if cfg.train.on_nonfinite == "stop" or not m["params_finite"]:  # a skip cannot undo applied values
                raise NonFiniteError(
                    f"non-finite values at step {n} (loss {float(m['loss'])}, grad norm {float(m['grad_norm'])}, "
                    f"parameter norm {float(m['param_norm'])}); the last checkpoint is untouched. Lower optim.lr, "
                    "set optim.clip_norm, or set train.on_nonfinite=skip"
                )

    def save():
        data_state = {**data_meta, "shards": _gather_positions(batches.positions, cfg.data.num_shards).tolist()}
        if checkpointer.save(state, data_state, to_dict(cfg)):
            log.info("saving checkpoint at step %d", int(jax.device_get(state.step)))

    def evaluate(step: int) -> dict:
        result = {**evaluator(state.params), "step": step}
        writer.write("eval", step, {k: v for k, v in result.items() if k != "step"})
        if primary:
            bpb = result["bits_per_byte"]
            log.info("eval at step %d: loss %.4f, perplexity %.3f, bits/byte %s", step, result["loss"],
                     result["perplexity"], "n/a" if bpb is None else f"{bpb:.4f}")
        window.restart_clock()
        return result

    for step in range(first, steps):
        if stop(step):
            flush()
            save()
            bar.close()
            log.info("stopping at step %d on request; rerun the same command to resume", step)
            return {"preempted": True, "step": step}
        batch = host_to_global(next(batches), s.mesh, batch_size)
        state, metrics = train_step(state, batch)
        done = step + 1
        window.pending.append((done, metrics))
        if step == first:  # the first step compiles: keep it out of the throughput figures
            jax.block_until_ready(metrics)
            writer.write("train", done, {"first_step_seconds": time.perf_counter() - window.start})
            window.restart_clock()
        else:
            window.timed_steps += 1
        bar.update(1)
        last = done == steps
        if done % cfg.train.log_every == 0 or last:
            flush()
            fetched, window.fetched = window.fetched, []
            elapsed = time.perf_counter() - window.start
            finite = [m for _, m in fetched if m["finite"]]  # skipped steps stay out of the means
            newest = fetched[-1][1]
            logged = {
                "loss": float(np.mean([m["loss"] for m in finite])) if finite else None,
                "z_loss": float(np.mean([m["z_loss"] for m in finite])) if finite else None,
                "grad_norm": float(newest["grad_norm"]),
                "param_norm": float(newest["param_norm"]),
                "learning_rate": float(newest["learning_rate"]),
                "skipped_steps": int(newest["skipped_steps"]),
                **batches.stats.as_dict(),
                "data_epoch_min": min(p.epoch for p in batches.positions.values()),
                "data_epoch_max": max(p.epoch for p in batches.positions.values()),
            }
            if window.timed_steps and elapsed > 0:
                logged["tokens_per_second"] = window.timed_steps * batch_size * seq_len / elapsed
                logged["step_seconds"] = elapsed / window.timed_steps
                if peak:
                    logged["mfu"] = flops_per_step * window.timed_steps / elapsed / (jax.device_count() * peak)
            writer.write("train", done, logged)
            postfix = {"loss": "skipped" if logged["loss"] is None else f"{logged['loss']:.3f}"}
            if "tokens_per_second" in logged:
                postfix["tok/s"] = f"{logged['tokens_per_second']:,.0f}"
            if "mfu" in logged:
                postfix["mfu"] = f"{100 * logged['mfu']:.1f}%"
            if logged["invalid_utf8"] or logged["bad_records"]:
                postfix["bad docs"] = logged["invalid_utf8"] + logged["bad_records"]
            bar.set_postfix(postfix)
            if bar.disable and primary:
                log.info("step %d: %s", done, ", ".join(f"{k} {v}" for k, v in postfix.items()))
            window.restart_clock()
        if cfg.eval.every and done % cfg.eval.every == 0 and not last:
            flush()
            evaluate(done)
        if done % cfg.checkpoint.every == 0 or last:
            flush()
            save()
    bar.close()
    if first >= steps:
        log.info("%s is already trained to step %d", cfg.train.run_dir, first)
    return evaluate(max(first, steps))
