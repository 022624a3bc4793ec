"""Perplexity and bits per byte over a whole held-out split.

Perplexity is exp(token-weighted mean NLL) over every target token of the split, each
counted once: no batch is dropped and padding has weight zero. Bits per byte divide the
same NLL sum (converted to bits) by the UTF-8 bytes of the documents, so models with
different tokenizers compare. Sums are accumulated in float64 on the host.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from t2x.config import Config
from t2x.data.pipeline import check_data, eval_dataset
from t2x.data.sources import DataError, DataStats, Source
from t2x.data.tokenizer import Tokenizer
from t2x.parallel import host_to_global, process_row_range
from t2x.train.step import jit_eval_step, make_eval_step


def summarize(nll_sum: float, tokens: int, num_bytes: int) -> dict[str, float | int | None]:
    """Loss, perplexity and bits per byte from summed NLL (nats), target tokens and bytes.

    ``bits_per_byte`` is None when no document ended inside the evaluated rows (a capped
    evaluation of long documents), since their bytes are counted with their last token.
    """
    loss = nll_sum / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll_sum / (math.log(2) * num_bytes) if num_bytes else None,
        "tokens": int(tokens),
        "bytes": int(num_bytes),
    }


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


class Evaluator:
    """Evaluates parameters on the eval split; the tokenized split is cached after one pass.

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
        self.stats = DataStats()
        self.dataset = eval_dataset(
            self.source,
            tokenizer,
            cfg.data,
            self.batch_size,
            process_row_range(mesh, self.batch_size),
            self.stats,
            cache=self.max_batches is None,
        )
        self.step = jit_eval_step(make_eval_step(model, tokenizer.bos_id, tokenizer.eos_id), param_shardings, mesh)

    def __call__(self, params: Any) -> dict[str, float]:
        """Loss, perplexity, bits per byte, tokens, bytes and documents read over the split
        (or ``max_batches``)."""
        if self.max_batches is not None:  # uncached: count this evaluation's reading alone
            self.stats.reset()
        sums = []
        for i, local in enumerate(self.dataset.as_numpy_iterator()):
            if self.max_batches is not None and i >= self.max_batches:
                break
            if not _any_process(bool(local["segment_ids"].any())):
                break
            sums.append(self.step(params, host_to_global(local, self.mesh, self.batch_size)))
        nll_sum, counts = 0.0, {"tokens": 0, "bytes": 0, "documents": 0}
        for batch_sums in jax.device_get(sums):
            nll_sum += float(batch_sums["nll_sum"])
            for k in counts:
                counts[k] += int(batch_sums[k])
        if counts["tokens"] == 0:
            raise DataError(f"{self.source.description} has no documents to evaluate")
        read = self.stats.as_dict()
        return {
            **summarize(nll_sum, counts["tokens"], counts["bytes"]),
            "documents": counts["documents"],  # documents whose last token was evaluated
            "invalid_utf8": read["invalid_utf8"],
            "bad_records": read["bad_records"],
            "batches": len(sums),
        }


def evaluate_checkpoint(cfg: Config, run_dir, step: int | None = None, devices=None) -> dict[str, Any]:
    """Evaluate the parameters of a run's checkpoint (``step`` None: the latest).

    The data and tokenizer are checked before the checkpoint is read.

    Returns:
      loss, perplexity, bits_per_byte, tokens, bytes, batches and step.
    """
    from t2x.checkpoint import Checkpointer
    from t2x.components import build
    from t2x.parallel import logical_to_shardings, sharding_context
    from t2x.rundir import CHECKPOINTS, tokenizer_spec
    from t2x.train.state import abstract_params

    c = build(cfg, tokenizer_spec(cfg, run_dir), devices)
    with sharding_context(c.mesh):
        abstract, logical = abstract_params(c.model, cfg.data.seq_len)
        shardings = logical_to_shardings(logical, abstract, c.mesh)
        evaluator = Evaluator(cfg, c.tokenizer, c.model, c.mesh, shardings)
        checkpointer = Checkpointer(os.path.join(run_dir, CHECKPOINTS), read_only=True)
        try:
            params, step = checkpointer.restore_params(step, abstract, shardings)
        finally:
            checkpointer.close()
        return {**evaluator(params), "step": step}
