"""Perplexity and bits per byte over a whole held-out split.

Perplexity is exp(token-weighted mean NLL) over every target token of the split, each
counted once: no batch is dropped and padding has weight zero. Bits per byte divide the
same NLL sum (converted to bits) by the UTF-8 bytes of text the scored tokens stand for
(each document's text and the separator its EOS replaced, such as a line's newline), so
models with different tokenizers compare. Sums are accumulated in float64 on the host.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from t2x.config import Config, ConfigError
from t2x.data.pipeline import check_data, data_errors, eval_dataset
from t2x.data.reader import PROBLEMS, DataError, DataStats
from t2x.data.sources import Source
from t2x.data.tokenizer import Tokenizer
from t2x.data.labelled import eval_batches, read_labelled
from t2x.families import task
from t2x.parallel import batch_sharding, host_to_global, process_rows, replicated
from t2x.parallel.distributed import any_process, sum_over_processes

log = logging.getLogger(__name__)


def make_eval_step(model: nn.Module, cfg: Config, tokenizer: Tokenizer) -> Callable[[dict, dict, jax.Array], dict]:
    """``step(params, batch, index) -> sums`` over the batch, the family's eval sums
    (``Family.eval_sums``). The objective's draws (masks) come from
    ``objective.eval_seed`` and the batch's index, so every evaluation draws the same.
    With ``train.loss_chunk_len``, the model returns its ``VocabLogits`` and the sums
    compute the logits that many positions at a time, as the train step's loss does."""
    fam = task(cfg)
    objective, batch_sums = fam.objective(cfg, tokenizer), fam.eval_sums(cfg, tokenizer)
    key = jax.random.key(cfg.objective.eval_seed)

    def step(params, batch, index):
        example = objective(batch, jax.random.fold_in(key, index))
        deferred = {"deferred": True} if cfg.train.loss_chunk_len else {}
        logits = model.apply({"params": params}, **example["model"], deterministic=True, **deferred)
        return batch_sums(logits, example, batch)

    return step


class Evaluator:
    """Evaluates parameters on the eval split: held-out text, or, for a classifier
    (``classify.labels``), labelled examples.

    The tokenized split is cached in memory after the first pass (on every process, its
    own rows) unless ``eval.max_batches`` caps the evaluation.

    Args:
      cfg: run config (data, eval batch size, ``eval.max_batches``).
      tokenizer: the run's tokenizer.
      model: the Flax model.
      mesh: device mesh.
      param_shardings: shardings of the parameters passed in.
    """

    def __init__(self, cfg: Config, tokenizer: Tokenizer, model, mesh: Mesh, param_shardings: Any):
        self.mesh = mesh
        self.batch_size = cfg.eval_batch_size
        self.max_batches = cfg.eval.max_batches
        self.summarize = task(cfg).summarize
        rows = process_rows(mesh, self.batch_size)
        if cfg.classify.enabled:
            self.labelled = read_labelled(cfg, "eval", tokenizer)
            self.description = self.labelled.description
            self.batches = lambda: eval_batches(self.labelled, self.batch_size, rows)
        else:
            self.labelled = None
            self.source = Source(cfg.data, "eval")
            self.description = self.source.description
            check_data(self.source, cfg.data, every_shard=False)
            self.stats = DataStats(strict=cfg.data.strict)
            self.dataset = eval_dataset(self.source, tokenizer, cfg.data, self.batch_size, rows, self.stats,
                                        cache=self.max_batches is None, row_format=task(cfg).rows(cfg, tokenizer))
            self.batches = self.dataset.as_numpy_iterator
        self.step = jax.jit(
            make_eval_step(model, cfg, tokenizer),
            in_shardings=(param_shardings, batch_sharding(mesh), replicated(mesh)),
            out_shardings=replicated(mesh),
        )

    def __call__(self, params: Any) -> dict[str, Any]:
        """The metrics of the family (decoders: loss, perplexity, bits per byte, tokens,
        bytes, documents; encoders: loss, perplexity, accuracy of the masked tokens) or of
        the classifier, the input problems met, and batches, over the split (or
        ``max_batches``)."""
        if self.labelled is None and self.max_batches is not None:  # uncached: count this evaluation's reading alone
            self.stats.reset()
        sums = []
        with contextlib.nullcontext() if self.labelled is not None else data_errors(self.stats):
            for i, local in enumerate(self.batches()):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                if self.labelled is None and not any_process(bool(local["segment_ids"].any())):
                    break
                sums.append(self.step(params, host_to_global(local, self.mesh, self.batch_size), np.int32(i)))
        totals: dict[str, Any] = {}
        for batch_sums in jax.device_get(sums):  # float64 and int64 on the host
            for k, v in batch_sums.items():
                totals[k] = totals.get(k, 0) + np.asarray(v, np.float64 if np.issubdtype(v.dtype, np.floating) else np.int64)
        if not totals.get("tokens"):
            raise DataError(f"{self.description} has no documents to evaluate")
        if self.labelled is not None:
            return {**self.summarize(totals), "truncated": self.labelled.truncated, "batches": len(sums)}
        read = sum_over_processes(self.stats.as_dict())
        return {**self.summarize(totals), **{k: read[k] for k in PROBLEMS}, "batches": len(sums)}


def evaluate_checkpoint(cfg: Config, run_dir, step: int | None = None, devices=None) -> dict[str, Any]:
    """Evaluate the parameters of a run's checkpoint, or of an export directory.

    ``step`` None takes the newest checkpoint that verifies (an older one, with a
    warning, when newer ones are damaged and ``checkpoint.on_damage`` is ``fallback``);
    a given step must verify. Nothing in the run directory is changed. The data and
    tokenizer are checked before the checkpoint is read.

    Returns:
      loss, perplexity, bits_per_byte, tokens, bytes, documents, input problems, batches
      and step.

    Raises:
      CheckpointError: no checkpoint (of that step), or it is damaged or does not fit.
    """
    from t2x.checkpoint import restore_params
    from t2x.components import build
    from t2x.export import is_export, read_export
    from t2x.models import abstract_params
    from t2x.parallel import logical_to_shardings, sharding_context
    from t2x.rundir import CHECKPOINTS, tokenizer_spec

    c = build(cfg, tokenizer_spec(cfg, run_dir), devices)
    with sharding_context(c.mesh):
        abstract, logical = abstract_params(c.model, cfg.data.seq_len)
        shardings = logical_to_shardings(logical, abstract, c.mesh)
        evaluator = Evaluator(cfg, c.tokenizer, c.model, c.mesh, shardings)
        if is_export(run_dir):
            if step is not None:
                raise ConfigError(f"--step applies to run directories; {run_dir} is an export of one step")
            exported = read_export(run_dir)
            params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s), exported.params, shardings)
            return {**evaluator(params), "step": exported.source["manifest"]["source"].get("step")}
        params, step = restore_params(os.path.join(run_dir, CHECKPOINTS), step, abstract, shardings,
                                      cfg.checkpoint.on_damage)
        return {**evaluator(params), "step": step}
