"""The training loop: validate, resume or initialize, step, log, evaluate, checkpoint."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from t2x.checkpoint import Checkpointer
from t2x.components import build
from t2x.config import Config, to_dict, to_yaml, without_launch_settings
from t2x.data.pipeline import TrainBatches, check_data, positions_to_state, state_to_positions
from t2x.data.reader import PROBLEMS
from t2x.data.sources import Source
from t2x.evaluate import Evaluator
from t2x.data.labelled import LabelledBatches, read_labelled
from t2x.families import task
from t2x.flops import peak_flops_per_device, run_flops_per_step
from t2x.parallel import host_to_global, process_rows, sharding_context
from t2x.parallel.distributed import sum_over_processes
from t2x.rundir import CHECKPOINTS, check_writable, has_tokenizer, recorded_config, write_run_files
from t2x.train.metrics import MetricsWriter
from t2x.train.preemption import StopRequest
from t2x.train.resume import Target, data_meta, resume
from t2x.models import abstract_params, count_params
from t2x.train.state import init_state, make_optimizer, state_from_params, state_shardings
from t2x.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss, gradient or parameters became NaN or infinite; nothing from that step was saved."""


def _check_same_config_everywhere(cfg: Config) -> None:
    """Every process of a job must run the same config (launch settings aside)."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(to_yaml(without_launch_settings(cfg)).encode()).digest()[:8], np.int32)
    multihost_utils.assert_equal(digest, "the processes of this job were started with different configs")


def _tokenizer_spec(cfg: Config, run_dir: str) -> str:
    """A run keeps the tokenizer it started with: its run directory's copy, unless
    ``data.tokenizer`` now names another (a resume then checks it against the checkpoint)."""
    recorded = recorded_config(run_dir)
    if recorded is not None and recorded.data.tokenizer == cfg.data.tokenizer and has_tokenizer(run_dir):
        return run_dir
    return cfg.data.tokenizer


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
    """Train ``cfg`` (resuming from its run directory's newest checkpoint that verifies) and evaluate.

    The config, mesh, tokenizer, data and run directory are all checked before any
    checkpoint is read or written, and the run's files are rewritten only once the
    checkpoint it resumes from has been accepted.

    SIGTERM (or Ctrl-C) stops the run at a step every process agrees on, after saving it;
    rerunning resumes.

    Returns:
      The final held-out evaluation (loss, perplexity, bits_per_byte, tokens, bytes,
      step, ...), or ``{"preempted": True, "step": N}`` when stopped early.
    """
    _check_same_config_everywhere(cfg)
    run = _Run(cfg, devices)
    try:
        return run.loop()
    finally:
        run.close()


class _Run:
    """One launch of a run: everything built and checked, then the loop."""

    def __init__(self, cfg: Config, devices=None):
        self.cfg = cfg
        self.primary = jax.process_index() == 0
        run_dir = cfg.train.run_dir
        self.c = build(cfg, _tokenizer_spec(cfg, run_dir), devices)
        if cfg.classify.enabled:  # labelled examples, read whole (t2x.data.labelled)
            self.source = self.labelled = read_labelled(cfg, "train", self.c.tokenizer)
        else:
            self.source, self.labelled = Source(cfg.data, "train"), None
            check_data(self.source, cfg.data, every_shard=True)
        if (self.labelled is None and 0 < len(self.source.files) < cfg.data.num_shards
                and not self.source.splits_files(cfg.data.num_shards)):
            log.warning(
                "%s has fewer files than data.num_shards (%d) and they cannot be read in byte ranges (gzip, "
                "TFRecord or a file per document): every shard reads all of them and keeps its own records; split "
                "the data into at least %d files (or uncompressed text or JSONL) so each byte is read once",
                self.source.description, cfg.data.num_shards, cfg.data.num_shards,
            )
        self.tx, self.schedule = make_optimizer(cfg)
        self.data_meta = data_meta(cfg, self.source, self.c.tokenizer)
        self._context = sharding_context(self.c.mesh)
        self._context.__enter__()
        self.checkpointer = self.batches = self.writer = self.stop = None
        try:
            self._start(run_dir)
        except BaseException:
            self.close()
            raise

    def _start(self, run_dir: str) -> None:
        cfg, c = self.cfg, self.c
        seq_len = cfg.data.seq_len
        abstract, self.shardings = state_shardings(c.model, self.tx, c.mesh, seq_len)
        self.evaluator = Evaluator(cfg, c.tokenizer, c.model, c.mesh, self.shardings.params)
        check_writable(cfg)
        self.checkpointer = Checkpointer(os.path.join(run_dir, CHECKPOINTS), cfg.checkpoint)
        _, logical = abstract_params(c.model, seq_len)
        resumed = resume(self.checkpointer, cfg, self.data_meta, Target(abstract, self.shardings, logical, c.mesh))
        if resumed is None and cfg.train.init_from:
            self.state = state_from_params(self._initial_params(abstract), self.tx, self.shardings)
            positions = None
            self.newest_checkpoint = None
            log.info("initialized %s parameters from %s", f"{count_params(self.state.params):,}", cfg.train.init_from)
        elif resumed is None:
            self.state = init_state(c.model, self.tx, self.shardings, cfg.train.seed, seq_len)
            positions = None
            self.newest_checkpoint = None
            log.info("initialized %s parameters", f"{count_params(self.state.params):,}")
        else:
            self.state = resumed.state
            positions = state_to_positions(resumed.data_state["shards"])
            self.newest_checkpoint = resumed.step
            log.info("resumed %s from step %d", run_dir, resumed.step)
        if self.primary:
            write_run_files(run_dir, cfg, c.tokenizer.files)
        batch_size = cfg.train.global_batch_size
        fam = task(cfg)
        rows = process_rows(c.mesh, batch_size)
        if self.labelled is not None:
            self.batches = LabelledBatches(self.labelled, batch_size, cfg.train.seed, rows,
                                           0 if resumed is None else resumed.step)
        else:
            self.batches = TrainBatches(self.source, c.tokenizer, cfg.data, batch_size, cfg.train.seed, rows, positions,
                                        fam.rows(cfg, c.tokenizer))
        objective = fam.objective(cfg, c.tokenizer)
        self.train_step = jit_train_step(make_train_step(c.model, self.tx, self.schedule, cfg, objective),
                                         self.shardings, c.mesh)
        self.writer = MetricsWriter(run_dir, enabled=self.primary)
        if resumed is not None:  # later records of steps after it supersede earlier ones
            self.writer.write("resume", resumed.step, {})
        self.stop = StopRequest()
        self.window = _Window()
        self.skips_in_a_row = 0
        self.unconfirmed: int | None = None  # newest save of this launch, not yet followed by finite steps

    def _initial_params(self, abstract) -> Any:
        """``train.init_from``'s parameters as host arrays; for a classifier, its backbone's,
        with a freshly initialized head."""
        from t2x.export import backbone_params, initial_params
        from t2x.models.classifier import BACKBONE

        cfg, c = self.cfg, self.c
        if not cfg.classify.enabled:
            return initial_params(cfg.train.init_from, cfg.model, c.tokenizer.fingerprint, abstract.params)
        backbone, unused = backbone_params(cfg.train.init_from, cfg.model, c.tokenizer.fingerprint,
                                           abstract.params[BACKBONE])
        fresh = init_state(c.model, self.tx, self.shardings, cfg.train.seed, cfg.data.seq_len).params
        head = {k: v for k, v in fresh.items() if k != BACKBONE}
        head = jax.tree.map(np.asarray, multihost_utils.process_allgather(head, tiled=True))
        log.info("fine-tuning from %s: took its %d backbone parameters; not used: %s; new: %s", cfg.train.init_from,
                 len(jax.tree.leaves(backbone)), ", ".join(unused) or "none", ", ".join(sorted(head)))
        return {BACKBONE: backbone, **head}

    def close(self) -> None:
        try:
            for part in (self.stop, self.writer, self.batches):
                if part is not None:
                    part.close()
            if self.checkpointer is not None:
                self.checkpointer.close()
        finally:
            self._context.__exit__(None, None, None)

    # Checkpoints.

    def save(self, step: int) -> None:
        positions = positions_to_state(self.batches.positions, self.cfg.data.num_shards)
        if jax.process_count() > 1:  # each shard's position, from the processes that read it
            positions = np.max(multihost_utils.process_allgather(positions), axis=0)
        data_state = {**self.data_meta, "shards": positions.tolist()}
        arrays = {"params": self.state.params, "opt_state": self.state.opt_state}
        json_items = {"data": data_state, "config": to_dict(without_launch_settings(self.cfg))}
        if self.checkpointer.save(step, arrays, json_items):
            log.info("saving checkpoint at step %d", step)
            self.unconfirmed, self.newest_checkpoint = step, step
            self.retain()

    def retain(self) -> None:
        """Delete what retention allows; the newest save counts only once steps after it
        were finite (or the run ended)."""
        ckpt = self.cfg.checkpoint
        self.checkpointer.retain(ckpt.keep, ckpt.keep_every, self.unconfirmed)

    def _checkpoint_note(self) -> str:
        """Which checkpoints a non-finite stop leaves, for its message."""
        self.checkpointer.wait()
        steps = self.checkpointer.local_steps()
        if self.newest_checkpoint is None or not steps:
            return "no checkpoint has been saved yet"
        earlier = [s for s in steps if s < self.newest_checkpoint]
        note = f"the newest checkpoint, step {self.newest_checkpoint}, is untouched"
        if earlier:
            note += (f"; if it had already diverged, step {earlier[-1]} is the last good one before it "
                     f"(checkpoints kept: {', '.join(map(str, steps))})")
        return note

    # Metrics.

    def flush(self) -> None:
        """Fetch pending metrics; stop at a non-finite step unless its update was skipped."""
        window, cfg = self.window, self.cfg
        values = jax.device_get([m for _, m in window.pending])
        fetched = list(zip([n for n, _ in window.pending], values))
        window.pending.clear()
        window.fetched.extend(fetched)
        for n, m in fetched:
            if m["finite"]:
                self.skips_in_a_row = 0
                continue
            what = (f"non-finite values at step {n} (loss {float(m['loss'])}, grad norm {float(m['grad_norm'])}, "
                    f"parameter norm {float(m['param_norm'])})")
            if cfg.train.on_nonfinite == "stop" or not m["params_finite"]:  # a skip cannot undo applied values
                raise NonFiniteError(
                    f"{what}; {self._checkpoint_note()}. Lower optim.lr, set optim.clip_norm, or set "
                    "train.on_nonfinite=skip"
                )
            self.skips_in_a_row += 1
            log.warning("%s: the update was skipped (%d in a row)", what, self.skips_in_a_row)
            if self.skips_in_a_row >= cfg.train.max_consecutive_skips:
                raise NonFiniteError(
                    f"{self.skips_in_a_row} updates in a row were skipped, up to step {n} "
                    f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips}); {self._checkpoint_note()}. "
                    "Lower optim.lr or set optim.clip_norm"
                )

    def log_window(self, done: int, bar: tqdm) -> None:
        cfg, window = self.cfg, self.window
        batch_size, seq_len = cfg.train.global_batch_size, cfg.data.seq_len
        self.flush()
        fetched, window.fetched = window.fetched, []
        elapsed = time.perf_counter() - window.start
        finite = [m for _, m in fetched if m["finite"]]  # skipped steps stay out of the means
        newest = fetched[-1][1]
        positions = self.batches.positions.values()
        epochs = [p.epoch for p in positions] if positions else [self.batches.epoch]
        logged = {
            "loss": float(np.mean([m["loss"] for m in finite])) if finite else None,
            "z_loss": float(np.mean([m["z_loss"] for m in finite])) if finite else None,
            **{k: float(np.mean([m[k] for m in finite])) if finite else None  # further heads' losses
               for k in newest if k.endswith("_loss") and k not in ("loss", "z_loss")},
            "grad_norm": float(newest["grad_norm"]),
            "param_norm": float(newest["param_norm"]),
            "learning_rate": float(newest["learning_rate"]),
            "skipped_steps": int(newest["skipped_steps"]),
            **sum_over_processes(self.batches.stats.as_dict()),
            "data_epoch_min": min(epochs),
            "data_epoch_max": max(epochs),
        }
        if window.timed_steps and elapsed > 0:
            logged["tokens_per_second"] = window.timed_steps * batch_size * seq_len / elapsed
            logged["step_seconds"] = elapsed / window.timed_steps
            if self.peak:
                logged["mfu"] = self.flops_per_step * window.timed_steps / elapsed / (jax.device_count() * self.peak)
        self.writer.write("train", done, logged)
        postfix = {"loss": "skipped" if logged["loss"] is None else f"{logged['loss']:.3f}"}
        if "tokens_per_second" in logged:
            postfix["tok/s"] = f"{logged['tokens_per_second']:,.0f}"
        if "mfu" in logged:
            postfix["mfu"] = f"{100 * logged['mfu']:.1f}%"
        bad = sum(logged[k] for k in PROBLEMS)
        if bad:
            postfix["bad data"] = bad
        bar.set_postfix(postfix)
        if bar.disable and self.primary:
            log.info("step %d: %s", done, ", ".join(f"{k} {v}" for k, v in postfix.items()))
        window.restart_clock()

    def evaluate(self, step: int) -> dict:
        result = {**self.evaluator(self.state.params), "step": step}
        self.writer.write("eval", step, {k: v for k, v in result.items() if k != "step"})
        if self.primary:
            shown = [f"{k} {result[k]:.4f}" for k in ("loss", "perplexity", "bits_per_byte", "accuracy")
                     if result.get(k) is not None]
            log.info("eval at step %d: %s", step, ", ".join(shown))
        self.window.restart_clock()
        return result

    # The loop.

    def loop(self) -> dict[str, Any]:
        cfg, window = self.cfg, self.window
        steps, batch_size = cfg.train.steps, cfg.train.global_batch_size
        targets = task(cfg).rows(cfg, self.c.tokenizer).lengths.get("targets") if not cfg.classify.enabled else None
        self.flops_per_step = run_flops_per_step(cfg, target_len=targets)
        self.peak = peak_flops_per_device(jax.devices()[0].device_kind, cfg.train.peak_flops_per_device)
        first = int(jax.device_get(self.state.step))
        bar = tqdm(total=steps, initial=min(first, steps), unit="step", dynamic_ncols=True,
                   disable=not (self.primary and cfg.train.progress_bar))
        for step in range(first, steps):
            if self.stop(step):
                self.flush()
                self.save(step)
                self.checkpointer.wait()
                bar.close()
                log.info("stopping at step %d on request; rerun the same command to resume", step)
                return {"preempted": True, "step": step}
            batch = host_to_global(next(self.batches), self.c.mesh, batch_size)
            self.state, metrics = self.train_step(self.state, batch)
            done = step + 1
            window.pending.append((done, metrics))
            if step == first:  # the first step compiles: keep it out of the throughput figures
                jax.block_until_ready(metrics)
                self.writer.write("train", done, {"first_step_seconds": time.perf_counter() - window.start})
                window.restart_clock()
            else:
                window.timed_steps += 1
            bar.update(1)
            last = done == steps
            if done % cfg.train.log_every == 0 or last:
                self.log_window(done, bar)
            if cfg.eval.every and done % cfg.eval.every == 0 and not last:
                self.flush()
                self.evaluate(done)
            if done % cfg.checkpoint.every == 0 or last:
                self.flush()
                self.save(done)
        bar.close()
        if first >= steps:
            log.info("%s is already trained to step %d", cfg.train.run_dir, first)
        self.checkpointer.wait()
        self.unconfirmed = None  # the run ended with finite values: the last save counts
        self.retain()
        result = self.evaluate(max(first, steps))
        if cfg.train.sample_tokens:
            result["sample"] = self.sample()
        return result

    def sample(self) -> str:
        """``train.sample_prompt`` continued by the trained model (on one device of each
        process, from the parameters gathered there): what ``t2x generate`` gives with
        the same settings and seed."""
        from t2x.export import Exported
        from t2x.infer.engine import generate
        from t2x.infer.model import place
        from t2x.infer.sampling import Sampling

        t = self.cfg.train
        params = multihost_utils.process_allgather(self.state.params, tiled=True)
        model = place(Exported(self.cfg, params, self.c.tokenizer.files, {"kind": "run", "path": t.run_dir}))
        sampling = Sampling(max_new_tokens=t.sample_tokens, temperature=t.sample_temperature, seed=t.seed)
        text = generate(model, [t.sample_prompt], sampling)[0].text
        log.info("sample: %r", t.sample_prompt + text)
        return text

