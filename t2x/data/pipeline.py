"""The tf.data input pipeline: logical shards of packed rows, assembled into batches.

Layout. The data is cut into ``num_shards`` logical shards. Each step, shard ``k``
supplies rows ``[k * R, (k + 1) * R)`` of the global batch, ``R = global_batch_size /
num_shards``. A process builds only the shards holding rows that land on its devices,
whatever their order in the mesh, and keeps exactly those rows, so the global batch at
a step depends on the data, the seed and the step alone, never on how many processes
read it.

One shard, per epoch: read records (file order shuffled per epoch) -> seeded document
shuffle buffer -> blocks of ``block_docs`` documents -> decode, tokenize and pack each
block into rows -> seeded shuffle of the rows within the block -> rows.

Position. A shard's position is (epoch, block, row): the next row to read. Resuming
rebuilds the shard, skips whole blocks before tokenization (reading only) and the rows
already read in the current block, so a resumed run reads exactly the rows the
uninterrupted run would have read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from t2x.config import DataConfig
from t2x.data.packing import DOCUMENTS, RowFormat
from t2x.data.reader import DataError, DataStats, dataset_options
from t2x.data.sources import Source, decode_records
from t2x.data.tokenizer import Tokenizer

try:  # tf.data only: keep TensorFlow off accelerators that JAX owns.
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):
    pass

log = logging.getLogger(__name__)

_META = "meta"  # per row: epoch, block, row within block, rows in block
_EPOCH, _BLOCK = "epoch", "block"  # per packed block, before rows are split out
_ENDLESS = 1 << 62
_OBJECTIVE_STREAM = 0x5350414E  # the packer's draws (span corruption), apart from the row shuffle's


@dataclasses.dataclass(frozen=True)
class ShardPosition:
    """Where a logical shard resumes: the next row to read."""

    epoch: int = 0
    block: int = 0
    row: int = 0


class RowLayout:
    """Which logical shards a process reads, and which of their rows it keeps.

    Args:
      global_batch_size: rows per global batch.
      num_shards: logical shards; each supplies ``global_batch_size / num_shards`` rows.
      rows: the global row indices this process's devices hold. They need not be
        contiguous: a mesh laid over a pod's physical topology can interleave hosts.
        The kept rows come out in ascending order, as
        ``jax.make_array_from_process_local_data`` expects them.
    """

    def __init__(self, global_batch_size: int, num_shards: int, rows: Sequence[int]):
        rows = sorted(int(r) for r in rows)
        self.rows_per_shard = global_batch_size // num_shards
        self.shards = sorted({r // self.rows_per_shard for r in rows})
        slot = {shard: i for i, shard in enumerate(self.shards)}
        # Index of each kept row among the rows of this process's shards, laid end to end.
        self.take = [slot[r // self.rows_per_shard] * self.rows_per_shard + r % self.rows_per_shard for r in rows]

    def select(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """Batches of this process's shards -> batches of its rows (the meta column stays whole)."""
        if self.take == list(range(len(self.shards) * self.rows_per_shard)):
            return dataset
        take = tf.constant(self.take, tf.int64)
        return dataset.map(lambda batch: {k: v if k == _META else tf.gather(v, take) for k, v in batch.items()})


@contextlib.contextmanager
def data_errors(stats: DataStats):
    """Turn the tf.data error that a strict-mode ``DataError`` raised inside the pipeline
    became back into that ``DataError``."""
    try:
        yield
    except tf.errors.OpError:
        if stats.first_error is not None:
            raise stats.first_error from None
        raise


def _block_packer(tokenizer: Tokenizer, cfg: DataConfig, source: Source, shard: int, seed: int, shuffle: bool,
                  stats, row_format: RowFormat):
    def pack_block(records, separators, epoch, block):
        texts, separators = decode_records(
            list(records), separators, source.format, cfg.text_key, cfg.invalid_utf8, stats, source.description,
            cfg.target_key,
        )
        targets = {}
        if cfg.target_key is not None:  # input-target pairs: the targets go to the row format as they are
            texts, target_texts = [a for a, _ in texts], [b for _, b in texts]
            targets["targets"] = tokenizer.encode(target_texts)
        documents = tokenizer.encode(texts)
        # block + 1: the end-of-epoch marker is block -1 (and holds no documents)
        draws = np.random.default_rng([seed, shard, int(epoch), int(block) + 1, _OBJECTIVE_STREAM])
        rows = row_format.pack(documents, tokenizer.token_bytes(documents, texts, separators), cfg.seq_len, tokenizer,
                               draws, **targets)
        count = len(rows["num_bytes"])
        if shuffle and count > 1:
            order = np.random.default_rng([seed, shard, int(epoch), int(block)]).permutation(count)
            rows = {k: v[order] for k, v in rows.items()}
        meta = np.stack(
            [np.full(count, epoch), np.full(count, block), np.arange(count), np.full(count, count)], axis=1
        ).astype(np.int64)
        return tuple(rows[k] for k in row_format.features) + (meta,)

    return pack_block


def shard_rows(
    source: Source,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    shard: int,
    seed: int,
    start: ShardPosition,
    train: bool,
    stats: DataStats,
    row_format: RowFormat = DOCUMENTS,
) -> tf.data.Dataset:
    """The packed rows of one logical shard, from ``start`` on, with ``row_format``'s features.

    Training streams repeat forever, reshuffled each epoch; evaluation streams make one
    pass in file order.
    """
    shuffle = train and cfg.shuffle
    read = source.shard_fn(shard, cfg.num_shards, seed, shuffle_files=shuffle, stats=stats)
    packer = _block_packer(tokenizer, cfg, source, shard, seed, shuffle, stats, row_format)
    seq_len = cfg.seq_len

    def epoch_blocks(epoch):
        records = read(epoch)
        if shuffle and cfg.doc_shuffle_buffer:
            doc_seed = tf.constant(seed * 1_000_003 + shard * 7919, tf.int64) + epoch * 104_729
            records = records.shuffle(cfg.doc_shuffle_buffer, seed=doc_seed, reshuffle_each_iteration=False)
        blocks = records.batch(cfg.block_docs).enumerate()
        blocks = blocks.skip(tf.where(epoch == start.epoch, tf.constant(start.block, tf.int64), 0))
        blocks = blocks.map(lambda block, recs: (epoch, block, recs[0], recs[1]))
        if not train:
            return blocks
        # An empty block -1 marks the epoch's end for the check below.
        end = (epoch, tf.constant(-1, tf.int64), tf.zeros([0], tf.string), tf.zeros([0], tf.int32))
        return blocks.concatenate(tf.data.Dataset.from_tensors(end))

    def pack(epoch, block, records, separators):
        *features, meta = tf.numpy_function(
            packer, [records, separators, epoch, block], [tf.int32] * len(row_format.features) + [tf.int64], stateful=False
        )
        rows = dict(zip(row_format.features, features))
        for name, x in rows.items():
            x.set_shape([None, *row_format.shape(name, seq_len)])
        meta.set_shape([None, 4])
        return {**rows, _META: meta, _EPOCH: epoch, _BLOCK: block}

    epochs = tf.data.Dataset.range(start.epoch, _ENDLESS) if train else tf.data.Dataset.range(1)
    rows = epochs.flat_map(epoch_blocks).map(pack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if train:
        rows = rows.map(_epoch_watch(source, shard, start, stats))  # in order, after the parallel packing
    rows = rows.map(lambda b: {k: v for k, v in b.items() if k not in (_EPOCH, _BLOCK)}).unbatch()
    return rows.skip(start.row) if start.row else rows


def _epoch_watch(source: Source, shard: int, start: ShardPosition, stats: DataStats):
    """A training shard that reads a whole epoch without a single row (its files deleted
    or unreadable since the run began) would be read again forever: stop it instead."""
    rows_in_epoch: dict[int, int] = {}

    def check(epoch, block, rows):
        epoch = int(epoch)
        if block >= 0:
            rows_in_epoch[epoch] = rows_in_epoch.get(epoch, 0) + int(rows)
            return True
        resumed_mid_epoch = epoch == start.epoch and start.block > 0
        if rows_in_epoch.pop(epoch, 0) == 0 and not resumed_mid_epoch:
            error = DataError(
                f"logical data shard {shard} of {source.description} read all of epoch {epoch} without a usable "
                "document: its files were deleted or became unreadable since the run began (see the warnings); "
                "restore them, or start a new train.run_dir for the data as it is now"
            )
            stats.first_error = stats.first_error or error
            raise error
        return True

    def watch(batch):
        ok = tf.numpy_function(check, [batch[_EPOCH], batch[_BLOCK], tf.shape(batch["num_bytes"])[0]], tf.bool)
        with tf.control_dependencies([ok]):
            return {k: tf.identity(v) for k, v in batch.items()}

    return watch


def _concat_shards(*shards):
    return {k: tf.concat([s[k] for s in shards], axis=0) for k in shards[0]}


SCAN_RECORDS = 10_000  # records read per shard, at most, to find usable text before a run


def _shard_has_text(source: Source, cfg: DataConfig, shard: int, stats: DataStats) -> tuple[bool, int]:
    """(whether the shard's first records hold usable text, how many records were read)."""
    records = source.shard_fn(shard, cfg.num_shards, 0, False, stats)(0).with_options(dataset_options())
    read = 0
    with data_errors(stats):
        for batch, separators in records.take(SCAN_RECORDS).batch(1024).as_numpy_iterator():
            read += len(batch)
            texts, _ = decode_records(
                list(batch), separators, source.format, cfg.text_key, cfg.invalid_utf8, stats, source.description,
                cfg.target_key,
            )
            if texts:
                return True, read
    return False, read


def check_data(source: Source, cfg: DataConfig, every_shard: bool) -> None:
    """Fail with a clear message, before a run starts, when the data holds no usable text.

    Args:
      source: a split.
      cfg: data config (shards, format, text field, UTF-8 policy).
      every_shard: training needs text in every logical shard (each supplies rows to
        every batch); evaluation needs it somewhere in the split, and gets a warning when
        most shards are empty (its batches would be mostly padding).

    Raises:
      DataError: naming the shard and what to check.
    """
    fields = "check data.text_key (the JSONL field or tf.train.Example feature), data.format and data.invalid_utf8"
    stats = DataStats(strict=cfg.strict)
    empty, unusable = [], []  # shards with no records at all; with records but no text
    for shard in range(cfg.num_shards):
        usable, read = _shard_has_text(source, cfg, shard, stats)
        if usable:
            continue
        if read and every_shard:
            raise DataError(
                f"the first {read:,} records of logical data shard {shard} in {source.description} hold "
                f"no usable text; {fields}"
            )
        (unusable if read else empty).append(shard)
    idle = len(empty) + len(unusable)
    if idle == 0:
        return
    if len(empty) == cfg.num_shards:
        raise DataError(f"{source.description} has no documents: the corpus is empty")
    if every_shard:
        raise DataError(
            f"logical data shards {empty} of {cfg.num_shards} have no documents in {source.description}: "
            "the corpus is too small for data.num_shards; lower it"
        )
    if idle == cfg.num_shards:
        raise DataError(f"{source.description} has no usable text to evaluate; {fields}")
    if 2 * idle >= cfg.num_shards:
        log.warning(
            "%s: only %d of %d logical data shards hold documents (%s), so evaluation batches are mostly "
            "padding and take up to %dx longer; evaluate with a lower data.num_shards",
            source.description, cfg.num_shards - idle, cfg.num_shards,
            "fewer files than shards, read whole" if source.cfg.text_unit == "file" else "a small split",
            cfg.num_shards // max(cfg.num_shards - idle, 1),
        )


class TrainBatches:
    """Host-local training batches with a checkpointable position.

    Run ``check_data(source, cfg, every_shard=True)`` first: a shard without usable text
    would never yield a row.

    Args:
      source: the training split.
      tokenizer: tokenizer for the text.
      cfg: data config.
      global_batch_size: rows per global batch.
      seed: run seed (shuffling).
      rows: the rows of the global batch this process holds (``process_rows``).
      positions: where each logical shard resumes (shard id -> position); absent: start.
      row_format: the family's row features (``t2x.families``).
    """

    def __init__(
        self,
        source: Source,
        tokenizer: Tokenizer,
        cfg: DataConfig,
        global_batch_size: int,
        seed: int,
        rows: Sequence[int],
        positions: dict[int, ShardPosition] | None = None,
        row_format: RowFormat = DOCUMENTS,
    ):
        layout = RowLayout(global_batch_size, cfg.num_shards, rows)
        self.shards = layout.shards
        self.rows_per_shard = layout.rows_per_shard
        self.stats = DataStats(strict=cfg.strict)
        positions = positions or {}
        self.positions = {k: positions.get(k, ShardPosition()) for k in self.shards}
        streams = [
            shard_rows(source, tokenizer, cfg, k, seed, self.positions[k], True, self.stats, row_format).batch(
                self.rows_per_shard, drop_remainder=True
            )
            for k in self.shards
        ]
        dataset = layout.select(tf.data.Dataset.zip(tuple(streams)).map(_concat_shards)).prefetch(cfg.prefetch)
        self.dataset = dataset.with_options(dataset_options())
        self._iterator = self.dataset.as_numpy_iterator()

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the pipeline's background work."""
        self._iterator = None

    def __next__(self) -> dict[str, np.ndarray]:
        with data_errors(self.stats):
            batch = next(self._iterator)
        meta = batch.pop(_META)
        for j, shard in enumerate(self.shards):
            epoch, block, row, rows_in_block = (int(x) for x in meta[(j + 1) * self.rows_per_shard - 1])
            self.positions[shard] = (
                ShardPosition(epoch, block + 1, 0) if row + 1 == rows_in_block else ShardPosition(epoch, block, row + 1)
            )
        return batch


def eval_dataset(
    source: Source,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    global_batch_size: int,
    rows: Sequence[int],
    stats: DataStats,
    cache: bool = True,
    row_format: RowFormat = DOCUMENTS,
) -> tf.data.Dataset:
    """Host-local evaluation batches over the whole split, one pass, then padding forever.

    Every document of the split is in exactly one row of one batch. Shards end at
    different steps, so each is followed by all-padding rows (``segment_ids`` 0);
    the caller stops when every process sees only padding. Iterate it inside
    ``data_errors(stats)``. ``row_format``: the family's row features.
    """
    layout = RowLayout(global_batch_size, cfg.num_shards, rows)
    padding_row = {name: tf.zeros(row_format.shape(name, cfg.seq_len), tf.int32) for name in row_format.features}
    padding = tf.data.Dataset.from_tensors({**padding_row, _META: tf.constant([-1, -1, -1, -1], tf.int64)}).repeat()
    streams = []
    for k in layout.shards:
        shard = shard_rows(source, tokenizer, cfg, k, 0, ShardPosition(), False, stats, row_format)
        if cache:
            shard = shard.cache()
        streams.append(shard.concatenate(padding).batch(layout.rows_per_shard))
    dataset = layout.select(tf.data.Dataset.zip(tuple(streams)).map(_concat_shards))
    return dataset.map(_drop_meta).prefetch(cfg.prefetch).with_options(dataset_options())


def _drop_meta(batch):
    return {k: v for k, v in batch.items() if k != _META}


def positions_to_state(positions: dict[int, ShardPosition], num_shards: int) -> np.ndarray:
    """Positions as an int64 array [num_shards, 3]; shards not held here are -1."""
    state = np.full((num_shards, 3), -1, np.int64)
    for shard, p in positions.items():
        state[shard] = (p.epoch, p.block, p.row)
    return state


def state_to_positions(state) -> dict[int, ShardPosition]:
    """Inverse of ``positions_to_state`` for the shards whose position is known."""
    return {k: ShardPosition(*(int(x) for x in row)) for k, row in enumerate(state) if min(row) >= 0}
