"""Typed run configuration: frozen dataclasses loaded from YAML with dotted overrides.

OmegaConf does the parsing, merging and type checking; each dataclass validates its own
values in ``__post_init__`` and ``Config`` checks the combinations. Every failure is a
``ConfigError`` whose message names the key to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(key: str, value: str, choices: Sequence[str]) -> None:
    _require(value in choices, f"{key} must be one of {list(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Transformer of one family.

    ``family`` picks the model and objective (``t2x.families``): ``decoder`` (GPT-style,
    causal LM), ``encoder`` (BERT-style, masked LM) or ``encoder_decoder`` (T5-style).
    """

    family: str = "decoder"  # decoder | encoder | encoder_decoder
    vocab_size: int = 50304
    d_model: int = 768
    num_layers: int = 12  # an encoder-decoder's encoder layers
    num_decoder_layers: Optional[int] = None  # encoder_decoder: decoder layers (None: num_layers)
    num_heads: int = 12
    num_kv_heads: Optional[int] = None  # None: multi-head attention (= num_heads)
    head_dim: Optional[int] = None  # None: d_model // num_heads
    d_ff: int = 3072
    max_seq_len: int = 1024
    position: str = "learned"  # learned | rope | relative (T5 buckets) | sinusoidal (the original Transformer)
    rope_theta: float = 10000.0
    relative_buckets: int = 32  # position=relative: buckets of T5's relative position bias
    relative_max_distance: int = 128  # position=relative: distances from this on share the last bucket
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu (tanh, GPT-2) | gelu_exact (erf, BERT) | relu (T5 1.0) | swiglu | geglu (T5 1.1)
    norm_position: str = "pre"  # pre: x + f(norm(x)) (GPT-2, Llama) | post: norm(x + f(x)) (BERT)
    embed_norm: bool = False  # normalize the summed embeddings (BERT)
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0: none (BERT: 2)
    use_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    attention: str = "auto"  # auto | xla | cudnn (see t2x.models.attention.self_attention_kernel)
    scan_layers: bool = True
    # scanned layers: blocks per iteration of the loop (num_layers: none left, the parameters
    # still stacked); null: the whole stack on a CPU, 1 elsewhere (t2x.models.transformer.scan_unroll)
    scan_unroll: Optional[int] = None
    remat: str = "none"  # none | full | dots | dots_no_batch

    def __post_init__(self):
        _one_of("model.family", self.family, ["decoder", "encoder", "encoder_decoder"])
        _one_of("model.position", self.position, ["learned", "rope", "relative", "sinusoidal"])
        _one_of("model.norm", self.norm, ["layernorm", "rmsnorm"])
        _one_of("model.mlp", self.mlp, ["gelu", "gelu_exact", "relu", "swiglu", "geglu"])
        _one_of("model.norm_position", self.norm_position, ["pre", "post"])
        _require(self.type_vocab_size >= 0, f"model.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        _require(self.num_decoder_layers is None or self.num_decoder_layers > 0,
                 f"model.num_decoder_layers must be positive or null, got {self.num_decoder_layers}")
        _require(self.relative_buckets > 1 and self.relative_max_distance > 1,
                 "model.relative_buckets and model.relative_max_distance must be > 1")
        _one_of("model.dtype", self.dtype, ["float32", "bfloat16"])
        _one_of("model.attention", self.attention, ["auto", "xla", "cudnn"])
        _require(self.attention != "cudnn" or self.dtype != "float32",
                 "model.attention=cudnn needs model.dtype=bfloat16: cuDNN's fused attention has no float32 "
                 "kernel (model.attention=auto takes cuDNN where it can and XLA elsewhere)")
        _one_of("model.remat", self.remat, ["none", "full", "dots", "dots_no_batch"])
        for key in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
            _require(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _require(self.scan_unroll is None or self.scan_unroll >= 1,
                 f"model.scan_unroll must be >= 1 (blocks per loop iteration) or null (automatic), "
                 f"got {self.scan_unroll}")
        _require(
            self.num_heads % self.kv_heads == 0,
            f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.kv_heads})",
        )
        if self.head_dim is None:
            _require(
                self.d_model % self.num_heads == 0,
                f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads}), "
                "or set model.head_dim",
            )
        if self.family != "encoder_decoder":
            _require(self.position in ("learned", "rope"),
                     f"model.position={self.position} is for model.family=encoder_decoder; use learned or rope")
        if self.position == "rope":
            _require(self.head_size % 2 == 0, f"rotary positions need an even head size, got {self.head_size}")

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is tokenized, and how it is cut into rows."""

    source: str = "builtin"  # builtin | files | tfds
    train_files: tuple[str, ...] = ()  # globs, for source=files
    eval_files: tuple[str, ...] = ()
    format: str = "auto"  # auto (by extension) | text | jsonl | tfrecord | csv | tsv (csv and tsv: classify only)
    text_unit: str = "line"  # text files: a document per line | per file
    text_key: str = "text"  # field of a JSONL object, tf.train.Example or TFDS example
    target_key: Optional[str] = None  # encoder-decoders: JSONL field of the target; the input is text_key (TSV: 2 columns)
    tfds_name: str = ""
    tfds_data_dir: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "validation"
    tokenizer: str = "builtin:4096"  # path to a SentencePiece .model, or builtin:VOCAB_SIZE
    seq_len: int = 1024
    target_seq_len: Optional[int] = None  # encoder-decoders: decoder row length (None: what seq_len's inputs need)
    num_shards: int = 8  # logical data shards; any process count dividing it reads the same batches
    block_docs: int = 256  # documents tokenized and packed together; rows shuffle within a block
    doc_shuffle_buffer: int = 1024  # documents; 0 disables document shuffling
    shuffle: bool = True
    invalid_utf8: str = "replace"  # replace | skip
    max_document_bytes: int = 16 << 20  # longer documents are skipped (counted as oversized)
    strict: bool = False  # stop at the first bad record, unreadable file or oversized document
    prefetch: int = 2

    def __post_init__(self):
        _one_of("data.source", self.source, ["builtin", "files", "tfds"])
        _one_of("data.format", self.format, ["auto", "text", "jsonl", "tfrecord", "csv", "tsv"])
        _one_of("data.text_unit", self.text_unit, ["line", "file"])
        _one_of("data.invalid_utf8", self.invalid_utf8, ["replace", "skip"])
        if self.source == "files":
            _require(
                len(self.train_files) + len(self.eval_files) > 0,
                "data.train_files or data.eval_files must name at least one file glob for data.source=files",
            )
        if self.source == "tfds":
            _require(bool(self.tfds_name), "data.tfds_name must be set for data.source=tfds")
        for key in ("seq_len", "num_shards", "block_docs", "prefetch", "max_document_bytes"):
            _require(getattr(self, key) > 0, f"data.{key} must be positive, got {getattr(self, key)}")
        _require(self.doc_shuffle_buffer >= 0, "data.doc_shuffle_buffer must be >= 0")
        _require(self.target_seq_len is None or self.target_seq_len >= 2,
                 f"data.target_seq_len must be at least 2 or null, got {self.target_seq_len}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; at most one may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.axis_sizes
        _require(
            all(s == -1 or s > 0 for s in sizes.values()),
            f"mesh sizes must be positive or -1, got {sizes}",
        )
        _require(list(sizes.values()).count(-1) <= 1, f"at most one mesh axis may be -1, got {sizes}")

    @property
    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


_YAML_BOOLEANS = {"True": "on", "False": "off", "true": "on", "false": "off"}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How the processes of a multi-process job find each other (``jax.distributed``).

    Left unset, the coordinator, process count and process id come from JAX's own
    detection (TPU pods, SLURM, Open MPI) or its ``JAX_*`` environment variables.
    """

    mode: str = "auto"  # auto: join a job when one is configured or detected | on: must | off: never
    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple[int, ...]] = None  # accelerators this process drives
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a process counts as lost
    shutdown_timeout: int = 300  # seconds to wait for the others at exit
    cpu_collectives: str = "gloo"  # gloo | mpi: how CPU processes communicate

    def __post_init__(self):
        # YAML 1.1 reads unquoted on/off (and yes/no, true/false) as booleans, which
        # OmegaConf hands to this string field as "True"/"False".
        object.__setattr__(self, "mode", _YAML_BOOLEANS.get(self.mode, self.mode))
        _one_of("distributed.mode", self.mode, ["auto", "on", "off"])
        _one_of("distributed.cpu_collectives", self.cpu_collectives, ["gloo", "mpi"])
        for key in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
            _require(getattr(self, key) > 0, f"distributed.{key} must be positive, got {getattr(self, key)}")
        if self.num_processes is not None:
            _require(self.num_processes > 0, "distributed.num_processes must be positive")
            if self.process_id is not None:
                _require(
                    0 <= self.process_id < self.num_processes,
                    f"distributed.process_id must be in [0, {self.num_processes}), got {self.process_id}",
                )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient handling (all optax)."""

    name: str = "adamw"  # adamw | adafactor
    lr: float = 6e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only: norms and biases are spared
    clip_norm: Optional[float] = 1.0  # global-norm clipping; null disables
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | rsqrt | constant
    decay_steps: Optional[int] = None  # length of warmup + decay; None: train.steps
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and linear decay

    def __post_init__(self):
        _one_of("optim.name", self.name, ["adamw", "adafactor"])
        _one_of("optim.decay", self.decay, ["cosine", "linear", "rsqrt", "constant"])
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
        _require(self.clip_norm is None or self.clip_norm > 0, "optim.clip_norm must be positive or null")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, batch, seeds, logging and numerics policy."""

    run_dir: str = "runs/default"
    steps: int = 1000
    global_batch_size: int = 64  # sequences per optimizer step, across all devices
    grad_accum_steps: int = 1  # micro-batches per step (optax.MultiSteps)
    seed: int = 0
    dropout_rng: str = "threefry2x32"  # PRNG of dropout's masks: threefry2x32 | rbg | unsafe_rbg (faster on GPU/TPU)
    z_loss: float = 0.0  # coefficient of log(Z)^2
    label_smoothing: float = 0.0  # of each token's target, this much spread evenly over the vocabulary
    loss_chunk_len: int = 0  # loss and eval compute the vocabulary logits at most this many positions of a row at a time (0: all)
    on_nonfinite: str = "stop"  # stop: exit naming the step | skip: drop that update
    max_consecutive_skips: int = 10  # with on_nonfinite=skip: stop after this many skipped steps in a row
    log_every: int = 10
    progress_bar: bool = True
    peak_flops_per_device: Optional[float] = None  # for MFU; None: look up the device kind
    init_from: Optional[str] = None  # an export (or run) directory whose parameters a new run starts from
    sample_tokens: int = 0  # at the end, continue sample_prompt by this many tokens (0: no sample)
    sample_prompt: str = ""
    sample_temperature: float = 0.8

    def __post_init__(self):
        _one_of("train.on_nonfinite", self.on_nonfinite, ["stop", "skip"])
        _one_of("train.dropout_rng", self.dropout_rng, ["threefry2x32", "rbg", "unsafe_rbg"])
        for key in ("steps", "global_batch_size", "grad_accum_steps", "log_every", "max_consecutive_skips"):
            _require(getattr(self, key) > 0, f"train.{key} must be positive, got {getattr(self, key)}")
        _require(self.z_loss >= 0, "train.z_loss must be >= 0")
        _require(0 <= self.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _require(self.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {self.sample_tokens}")
        _require(self.loss_chunk_len >= 0, f"train.loss_chunk_len must be >= 0 (0: no chunks), got {self.loss_chunk_len}")
        _require(self.sample_temperature >= 0, f"train.sample_temperature must be >= 0, got {self.sample_temperature}")
        _require(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        _require(bool(self.run_dir), "train.run_dir must be set")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When Orbax saves and which checkpoints it keeps."""

    every: int = 1000  # steps between saves; a save also happens at the last step
    keep: int = 3  # most recent checkpoints kept
    keep_every: Optional[int] = None  # also keep every step divisible by this
    async_save: bool = True
    on_damage: str = "fallback"  # fallback: resume from the newest checkpoint that verifies | stop

    def __post_init__(self):
        _one_of("checkpoint.on_damage", self.on_damage, ["fallback", "stop"])
        _require(self.every > 0, f"checkpoint.every must be positive, got {self.every}")
        _require(self.keep > 0, f"checkpoint.keep must be positive, got {self.keep}")
        _require(self.keep_every is None or self.keep_every > 0, "checkpoint.keep_every must be positive or null")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: cadence during training and batch size."""

    every: int = 0  # steps between evaluations during training; 0: only at the end
    global_batch_size: Optional[int] = None  # None: train.global_batch_size
    max_batches: Optional[int] = None  # None: the whole split (exact perplexity)

    def __post_init__(self):
        _require(self.every >= 0, "eval.every must be >= 0")
        _require(self.global_batch_size is None or self.global_batch_size > 0, "eval.global_batch_size must be positive")
        _require(self.max_batches is None or self.max_batches > 0, "eval.max_batches must be positive or null")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of the family's training objective (masked LM for encoders)."""

    mask_rate: float = 0.15  # masked LM: share of a row's text tokens chosen for prediction
    mask_token_rate: float = 0.8  # of the chosen: replaced by the mask token
    random_token_rate: float = 0.1  # of the chosen: replaced by a random token (the rest stay)
    whole_word_masking: bool = False  # choose whole words (every piece of a word, or none)
    # masked LM: most tokens of a row predicted, the masked-LM head run at those only
    # (None: ``predictions_per_row``'s margin over mask_rate; 0: every position)
    max_predictions: Optional[int] = None
    next_sentence: bool = False  # encoders: also predict whether B follows A in [CLS] A [SEP] B [SEP] pairs
    eval_seed: int = 0  # masks of held-out evaluation: the same for every evaluation
    noise_density: float = 0.15  # span corruption: share of a piece's tokens that are noise
    mean_span_length: float = 3.0  # span corruption: mean length of a noise span

    def __post_init__(self):
        _require(0.0 < self.mask_rate < 1.0, f"objective.mask_rate must be in (0, 1), got {self.mask_rate}")
        for key in ("mask_token_rate", "random_token_rate"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"objective.{key} must be in [0, 1], got {getattr(self, key)}")
        _require(
            self.mask_token_rate + self.random_token_rate <= 1.0,
            "objective.mask_token_rate + objective.random_token_rate must be at most 1 "
            f"(got {self.mask_token_rate} + {self.random_token_rate})",
        )
        _require(self.max_predictions is None or self.max_predictions >= 0,
                 f"objective.max_predictions must be >= 0 (0: every position) or null, got {self.max_predictions}")
        _require(self.eval_seed >= 0, f"objective.eval_seed must be >= 0, got {self.eval_seed}")
        _require(0.0 < self.noise_density < 1.0, f"objective.noise_density must be in (0, 1), got {self.noise_density}")
        _require(self.mean_span_length >= 1.0, f"objective.mean_span_length must be >= 1, got {self.mean_span_length}")

    def predictions_per_row(self, seq_len: int) -> int:
        """Positions of a row of ``seq_len`` tokens that masked LM predicts: ``max_predictions``,
        or with None a number of chosen tokens a row exceeds about once in a million:
        ``mask_rate`` x seq_len plus five standard deviations of that count, up to a
        multiple of 8 (seven with whole-word masking, whose words of L pieces chosen
        together make the count's variance E[L^2] / E[L] times larger: covered up to 2);
        ``seq_len`` with 0 or at least ``seq_len``."""
        cap = self.max_predictions
        if cap is None:
            mean, deviations = self.mask_rate * seq_len, 7 if self.whole_word_masking else 5
            cap = 8 * math.ceil((mean + deviations * math.sqrt(mean * (1 - self.mask_rate))) / 8)
        return min(cap, seq_len) if cap else seq_len


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    """Fine-tuning for text classification (``t2x finetune``): the labels and the head.

    The data are labelled examples (``data.text_key`` and ``label_key`` fields of JSONL,
    CSV or TSV rows, or of TFDS examples); each becomes one row, BOS text EOS, cut to
    ``data.seq_len``.
    """

    labels: tuple[str, ...] = ()  # the classes, in order; empty: not a classification run
    label_key: str = "label"  # field (JSONL, TFDS) or column (CSV, TSV) holding the label
    pooling: str = "auto"  # auto (cls for encoders, last for decoders, mean for encoder-decoders) | cls | mean | last

    def __post_init__(self):
        _one_of("classify.pooling", self.pooling, ["auto", "cls", "mean", "last"])
        _require(len(self.labels) != 1, "classify.labels needs at least two classes")
        duplicates = sorted({x for x in self.labels if self.labels.count(x) > 1})
        _require(not duplicates, f"classify.labels lists {duplicates} more than once")
        _require(bool(self.label_key), "classify.label_key must be set")

    @property
    def enabled(self) -> bool:
        return bool(self.labels)


@dataclasses.dataclass(frozen=True)
class Config:
    """One run: model, data, mesh and processes, objective, optimizer, loop, checkpoints and evaluation."""

    name: str = "run"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    classify: ClassifyConfig = dataclasses.field(default_factory=ClassifyConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self):
        batch, shards = self.train.global_batch_size, self.data.num_shards
        _require(
            batch % shards == 0,
            f"train.global_batch_size ({batch}) must be divisible by data.num_shards ({shards}): "
            "every logical data shard supplies the same number of rows to each batch",
        )
        eval_batch = self.eval_batch_size
        _require(
            eval_batch % shards == 0,
            f"eval.global_batch_size ({eval_batch}) must be divisible by data.num_shards ({shards})",
        )
        _require(
            batch % self.train.grad_accum_steps == 0,
            f"train.global_batch_size ({batch}) must be divisible by train.grad_accum_steps "
            f"({self.train.grad_accum_steps})",
        )
        if self.model.position == "learned":
            _require(
                self.data.seq_len <= self.model.max_seq_len,
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}) "
                "for learned positions",
            )
        _require(self.data.format not in ("csv", "tsv") or self.classify.enabled
                 or (self.data.format == "tsv" and self.data.target_key is not None),
                 f"data.format={self.data.format} holds labelled examples (classify.labels) or, tsv, input-target "
                 "pairs (data.target_key); pretraining reads text, jsonl or tfrecord")
        _require(self.data.target_key is None or self.model.family == "encoder_decoder",
                 "data.target_key reads input-target pairs for model.family=encoder_decoder")
        _require(not self.train.sample_tokens or (self.model.family == "decoder" and not self.classify.enabled),
                 "train.sample_tokens: only a decoder language model continues a prompt; set train.sample_tokens=0")
        if self.classify.enabled:
            _require(not self.train.loss_chunk_len,
                     "train.loss_chunk_len chunks a language model's vocabulary logits; a classifier's are "
                     "[batch, labels]: set train.loss_chunk_len=0")
            pooling = self.classify.pooling
            _require(pooling != "cls" or self.model.family == "encoder",
                     "classify.pooling=cls pools an encoder's first ([CLS]) token; a decoder or an encoder-decoder "
                     "pools last or mean")
        if self.objective.next_sentence:
            _require(self.model.family == "encoder" and self.model.type_vocab_size >= 2,
                     "objective.next_sentence pairs sentences A and B in an encoder: set model.family=encoder and "
                     "model.type_vocab_size=2")
        if self.model.family == "encoder":
            _require(
                self.data.seq_len >= 4,
                f"data.seq_len ({self.data.seq_len}) is too short to mask: an encoder row holds BOS, text and "
                "EOS, and needs at least 4 tokens",
            )
        if self.model.family == "encoder_decoder" and self.data.target_key is None and not self.classify.enabled:
            from t2x.data.span_corruption import corrupted_lengths

            # The shortest piece span corruption cuts (2 tokens: one noise, one kept) and its rows.
            inputs, targets = corrupted_lengths(2, self.objective.noise_density, self.objective.mean_span_length)
            _require(self.data.seq_len >= inputs,
                     f"data.seq_len ({self.data.seq_len}) is too short to corrupt: the shortest corrupted piece "
                     f"needs {inputs} input tokens; set data.seq_len >= {inputs}")
            _require(self.data.target_seq_len is None or self.data.target_seq_len >= targets,
                     f"data.target_seq_len ({self.data.target_seq_len}) is too short to corrupt: the shortest "
                     f"corrupted piece needs {targets} target tokens; set it >= {targets} (or null: as long as "
                     "data.seq_len's pieces need)")

    @property
    def eval_batch_size(self) -> int:
        return self.eval.global_batch_size or self.train.global_batch_size

    @property
    def decay_steps(self) -> int:
        return self.optim.decay_steps or self.train.steps


_SECTIONS = {f.name for f in dataclasses.fields(Config) if f.name != "name"}  # model, data, ...: groups of keys


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a Config from a YAML file (or the defaults) and apply dotted ``key=value`` overrides.

    Args:
      path: YAML file whose keys mirror the Config tree; None starts from the defaults.
      overrides: strings such as ``"model.num_layers=4"`` or ``"data.train_files=[a.txt]"``.

    Returns:
      The validated, frozen Config.

    Raises:
      ConfigError: a missing file, an unknown key, a wrong type or an impossible value,
        with a message naming the key.
    """
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        text = _read_text(str(path))
        try:
            loaded = OmegaConf.create(text)
        except Exception as e:  # YAML syntax errors come in several types
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} must map config sections (model:, data:, ...) to their keys, not be a list")
        for key in loaded:
            if key in _SECTIONS and not isinstance(loaded[key], DictConfig) and loaded[key] is not None:
                raise ConfigError(f"config key {key!r} in {path} is a section: give its keys ({key}: then indented keys)")
        layers.append(loaded)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    sections = [o for o in overrides if o.split("=", 1)[0].strip() in _SECTIONS]
    if sections:
        raise ConfigError(f"{sections[0]!r} sets a whole config section; set its keys instead, e.g. "
                          f"{sections[0].split('=', 1)[0].strip()}.KEY=VALUE")
    for override in overrides:
        try:
            layers.append(OmegaConf.from_dotlist([override]))
        except Exception as e:  # the value is parsed as YAML, whose errors come in several types
            raise ConfigError(f"override {override!r} cannot be parsed: {str(e).splitlines()[0]}") from None
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe_omegaconf_error(e, path)) from None
    except (TypeError, ValueError) as e:  # OmegaConf's own, for values it cannot merge into the schema
        if isinstance(e, ConfigError):
            raise
        where = f" (in {path} or the overrides)" if path else ""
        raise ConfigError(f"the config{where} does not fit the schema: {e}") from None


def config_from_dict(values: dict) -> Config:
    """A Config from the nested dict ``to_dict`` made (a checkpoint's record of its run).

    Raises:
      ConfigError: the values do not form a valid config.
    """
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(values)))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe_omegaconf_error(e, None)) from None


def _read_text(path: str) -> str:
    """A config file's text, local or remote (``gs://``, read through tf.io.gfile)."""
    if "://" not in path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            return f.read()
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with tf.io.gfile.GFile(path) as f:
        return f.read()


def _describe_omegaconf_error(e: OmegaConfBaseException, path) -> str:
    key = getattr(e, "full_key", None)
    first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f" (in {path} or the overrides)" if path else ""
    if key:
        return f"config key {key!r}: {first_line}{where}"
    return f"{first_line}{where}"


def without_launch_settings(config: Config) -> Config:
    """The config with ``distributed.*`` reset: how a job was launched (coordinator,
    process count and id) is not part of a run, so eval, export and a resume with
    another process count never inherit it."""
    return dataclasses.replace(config, distributed=DistributedConfig())


def to_yaml(config: Config) -> str:
    """The fully resolved config as YAML, loadable again with ``load_config``."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict:
    """The config as plain nested dicts and lists (for JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(config))
