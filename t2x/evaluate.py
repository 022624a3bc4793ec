"""Perplexity and bits per byte over a whole held-out split.

Perplexity is exp(token-weighted mean NLL) over every target token of the split, each
counted once: no batch is dropped and padding has weight zero. Bits per byte divide the
same NLL sum (converted to bits) by the UTF-8 bytes of text the scored tokens stand for
(each document's text and the separator its EOS replaced, such as a line's newline), so
models with different tokenizers compare. Sums are accumulated in float64 on the host.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from t2x.config import Config, ConfigError
from t2x.data.pipeline import check_data, data_errors, eval_dataset
from t2x.data.reader import PROBLEMS, DataError, DataStats
from t2x.data.sources import Source
from t2x.data.tokenizer import Tokenizer
from t2x.objectives import causal_lm, token_losses
from t2x.parallel import batch_sharding, host_to_global, process_rows, replicated
from t2x.parallel.distributed import any_process, sum_over_processes

log = logging.getLogger(__name__)


def summarize(nll_sum: float, tokens: int, num_bytes: int) -> dict[str, float | int | None]:
    """Loss, perplexity and bits per byte from summed NLL (nats), target tokens and bytes.

    ``perplexity`` is None when it overflows a float; ``bits_per_byte`` is None when the
    scored tokens stand for no bytes.
    """
    loss = nll_sum / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else None,
        "bits_per_byte": nll_sum / (math.log(2) * num_bytes) if num_bytes else None,
        "tokens": int(tokens),
        "bytes": int(num_bytes),
    }


def make_eval_step(model: nn.Module, bos_id: int, eos_id: int) -> Callable[[dict, dict], dict]:
    """``step(params, batch) -> sums`` over the batch: NLL (float32), and the integer counts
    of target tokens, bytes of text they stand for, and documents (EOS targets)."""

    def step(params, batch):
        example = causal_lm(batch, bos_id)
        logits = model.apply(
            {"params": params}, example["inputs"], example["positions"], example["segment_ids"], deterministic=True
        )
        nll, _ = token_losses(logits, example["targets"])
        real = batch["segment_ids"] > 0
        return {
            "nll_sum": jnp.sum(nll * example["weights"]),
            "tokens": jnp.sum(real, dtype=jnp.int32),
            "bytes": jnp.sum(batch["num_bytes"]),
            "documents": jnp.sum(real & (example["targets"] == eos_id), dtype=jnp.int32),
        }

    return step


class Evaluator:
    """Evaluates parameters on the eval split.

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
        self.source = Source(cfg.data, "eval")
        check_data(self.source, cfg.data, every_shard=False)
        self.stats = DataStats(strict=cfg.data.strict)
        self.dataset = eval_dataset(
            self.source,
            tokenizer,
            cfg.data,
            self.batch_size,
            process_rows(mesh, self.batch_size),
            self.stats,
            cache=self.max_batches is None,
        )
        self.step = jax.jit(
            make_eval_step(model, tokenizer.bos_id, tokenizer.eos_id),
            in_shardings=(param_shardings, batch_sharding(mesh)),
            out_shardings=replicated(mesh),
        )

    def __call__(self, params: Any) -> dict[str, Any]:
        """Loss, perplexity, bits per byte, tokens, bytes, documents, the input problems met
        and batches, over the split (or ``max_batches``)."""
        if self.max_batches is not None:  # uncached: count this evaluation's reading alone
            self.stats.reset()
        sums = []
        with data_errors(self.stats):
            for i, local in enumerate(self.dataset.as_numpy_iterator()):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                if not any_process(bool(local["segment_ids"].any())):
                    break
                sums.append(self.step(params, host_to_global(local, self.mesh, self.batch_size)))
        nll_sum, counts = 0.0, {"tokens": 0, "bytes": 0, "documents": 0}
        for batch_sums in jax.device_get(sums):
            nll_sum += float(batch_sums["nll_sum"])
            for k in counts:
                counts[k] += int(batch_sums[k])
        if counts["tokens"] == 0:
            raise DataError(f"{self.source.description} has no documents to evaluate")
        read = sum_over_processes(self.stats.as_dict())
        return {
            **summarize(nll_sum, counts["tokens"], counts["bytes"]),
            "documents": counts["documents"],  # documents whose last token was evaluated
            **{k: read[k] for k in PROBLEMS},
            "batches": len(sums),
        }


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
