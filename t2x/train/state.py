"""Train state (params, optax state, step), the optimizer, and their shardings."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from t2x.config import Config, OptimConfig
from t2x.models import abstract_params
from t2x.models.transformer import STACKED_LAYERS
from t2x.parallel import logical_to_shardings, replicated

DECAYED_PARAMS = ("kernel", "embedding")  # matrices; norms and biases are spared


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint restores: the step, parameters and optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine, linear, inverse-square-root or constant decay to ``total_steps``."""
    lr, warmup = optim.lr, optim.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    floor = lr * optim.min_lr_ratio
    if optim.decay == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim.min_lr_ratio)
    elif optim.decay == "linear":
        decay = optax.linear_schedule(lr, floor, decay_steps)
    elif optim.decay == "rsqrt":
        offset = max(warmup, 1)

        def decay(step):  # continuous with the warmup: lr * sqrt(warmup / step)
            return lr * jnp.sqrt(offset / (jnp.maximum(step, 0) + offset))

    else:
        decay = optax.constant_schedule(lr)
    if not warmup:
        return decay
    # lr * (step + 1) / warmup: the first step already learns, the last warmup step is at lr.
    ramp = optax.linear_schedule(lr / warmup, lr, max(warmup - 1, 1))
    return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to: kernels and embeddings."""

    def is_matrix(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1] in DECAYED_PARAMS

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def _names(path) -> list[str]:
    return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def is_stacked(params: Any) -> Any:
    """True for parameters of scanned layers: a leading ``[layers]`` axis holds one
    array per layer."""
    return jax.tree_util.tree_map_with_path(lambda path, _: STACKED_LAYERS in _names(path), params)


def per_layer(inner: optax.GradientTransformation, decoder_layers: int | None = None) -> optax.GradientTransformation:
    """``inner`` applied to each layer of scanned parameters separately (vmapped over
    the leading ``layers`` axis) and to the other parameters as they are, so statistics
    over a whole array (Adafactor's factored moments, update clipping, parameter scale)
    are the same whether layers are scanned or not. An encoder-decoder whose decoder has
    ``decoder_layers`` layers, other than its encoder's, vmaps its decoder stack apart."""

    def init(params):
        return jax.vmap(inner.init)(params) if jax.tree.leaves(params) else inner.init(params)

    def update(updates, state, params=None):
        if not jax.tree.leaves(updates):  # an unscanned model has no stacked parameters
            return inner.update(updates, state, params)
        return jax.vmap(inner.update)(updates, state, params)

    stacked = optax.GradientTransformation(init, update)

    def labels(params):
        def label(path, _):
            if STACKED_LAYERS not in _names(path):
                return "single"
            return "stacked_decoder" if decoder_layers and "decoder" in _names(path) else "stacked"

        return jax.tree_util.tree_map_with_path(label, params)

    transforms = {"stacked": stacked, "single": inner} | ({"stacked_decoder": stacked} if decoder_layers else {})
    return optax.multi_transform(transforms, labels)


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for a run and its learning-rate schedule.

    clip by global norm -> AdamW or Adafactor (masked weight decay), optionally skipping
    non-finite updates (``apply_if_finite``) and accumulating micro-batches (``MultiSteps``).
    Adafactor keeps its own defaults (factored second moments with decay rate 0.8, update
    clipping at RMS 1, steps relative to the parameter scale), computed per layer of
    scanned parameters; ``b1``, ``b2`` and ``eps`` are Adam's.
    """
    optim = cfg.optim
    schedule = make_schedule(optim, cfg.decay_steps)
    if optim.name == "adamw":
        base = optax.adamw(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask
        )
    else:
        # optax.adafactor's pieces, with the weight decay applied before the learning
        # rate, so that it means what it means for AdamW: p -= lr * (update + wd * p).
        base = optax.chain(
            per_layer(
                optax.chain(
                    optax.scale_by_factored_rms(),
                    optax.clip_by_block_rms(1.0),
                    optax.scale_by_param_block_rms(),
                ),
                decoder_layers=cfg.model.decoder_layers
                if cfg.model.family == "encoder_decoder" and cfg.model.decoder_layers != cfg.model.num_layers else None,
            ),
            optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    parts = ([optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []) + [base]
    tx = optax.chain(*parts)
    if cfg.train.on_nonfinite == "skip":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
    if cfg.train.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.train.grad_accum_steps)
    return tx, schedule


def base_opt_state(opt_state: Any, cfg: Config) -> Any:
    """The state of the optimizer proper (AdamW's moments, Adafactor's factors, the
    schedule's count) inside the wrappers ``make_optimizer`` adds for ``cfg``."""
    if cfg.train.grad_accum_steps > 1:
        opt_state = opt_state.inner_opt_state
    if cfg.train.on_nonfinite == "skip":
        opt_state = opt_state.inner_state
    return opt_state[-1]


def replace_base_opt_state(opt_state: Any, base: Any, cfg: Config) -> Any:
    """``opt_state`` (built for ``cfg``) with its optimizer proper replaced by ``base``."""

    def replace(state, wrappers):
        if wrappers and wrappers[0] == "accumulate":
            return state._replace(inner_opt_state=replace(state.inner_opt_state, wrappers[1:]))
        if wrappers and wrappers[0] == "skip":
            return state._replace(inner_state=replace(state.inner_state, wrappers[1:]))
        return (*state[:-1], base)

    wrappers = (["accumulate"] if cfg.train.grad_accum_steps > 1 else []) + (
        ["skip"] if cfg.train.on_nonfinite == "skip" else []
    )
    return replace(opt_state, wrappers)


def opt_state_shardings(opt_state: Any, params: Any, logical: Any, mesh: Mesh) -> Any:
    """NamedShardings of an optimizer state: statistics shaped like a parameter are
    sharded like it; the rest (counters, Adafactor's factored vectors) are replicated.

    A statistic belongs to the parameter whose path ends its own path (optax keeps them
    in trees shaped like the parameters, possibly with some parameters masked out).
    """
    param_specs = {
        tuple(_names(path)): (leaf.shape, spec)
        for (path, leaf), spec in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.structure(params).flatten_up_to(logical),
        )
    }

    def spec_of(path, leaf):
        trailing = []
        for key in reversed(path):
            if not isinstance(key, jax.tree_util.DictKey):
                break
            trailing.insert(0, key.key)
        shape, spec = param_specs.get(tuple(trailing), (None, None))
        return spec if shape == leaf.shape else PartitionSpec()

    opt_logical = jax.tree_util.tree_map_with_path(spec_of, opt_state)
    return logical_to_shardings(opt_logical, opt_state, mesh)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, seq_len: int):
    """Abstract TrainState and the NamedSharding of every leaf."""
    params, logical = abstract_params(model, seq_len)
    opt_state = jax.eval_shape(tx.init, params)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
    shardings = TrainState(
        step=replicated(mesh),
        params=logical_to_shardings(logical, params, mesh),
        opt_state=opt_state_shardings(opt_state, params, logical, mesh),
    )
    return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, shardings: TrainState, seed: int, seq_len: int):
    """A freshly initialized TrainState, created directly in its shards (never whole on one device)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)

    def init(rng):
        params = nn.unbox(model.init(rng, tokens)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def state_from_params(params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """A TrainState at step 0 holding ``params`` (host arrays, the same in every process)
    with a fresh optimizer state, created in its shards."""
    placed = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), params, shardings.params
    )

    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=shardings)(placed)


def skipped_updates(opt_state: Any) -> jax.Array:
    """Updates ``apply_if_finite`` has dropped so far (0 when the run does not skip)."""
    return optax.tree_utils.tree_get(opt_state, "total_notfinite", jnp.zeros((), jnp.int32))
