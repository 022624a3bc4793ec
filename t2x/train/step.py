"""The train step, jitted with explicit shardings."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from t2x.config import Config
from t2x.families import data_key
from t2x.objectives import chunked_lm_loss, smoothed_nll, token_losses
from t2x.parallel import batch_sharding, replicated
from t2x.train.state import TrainState, skipped_updates

Batch = dict[str, jax.Array]


def make_objective(model: nn.Module, cfg: Config) -> Callable:
    """``objective(params, example, total_weight, rng) -> (value, (nll_sum, z_sum, head_sums))``.

    ``value`` is (sum of token losses + ``train.z_loss`` x sum of log(Z)^2) over the
    example's weighted tokens, divided by ``total_weight / grad_accum_steps``: the
    whole-batch mean, once the micro-batches' gradients are averaged. A model with
    further heads (BERT's next-sentence prediction) returns ``(logits, {head: logits})``
    and the example holds ``heads[head]``: ``targets``, ``weights`` and ``total`` (the
    whole batch's weight); each head adds its own whole-batch mean NLL.

    A token's loss is its NLL, or with ``train.label_smoothing`` = e the cross-entropy
    against the target smoothed as the original Transformer's (1 - e on the target, e
    spread evenly over the vocabulary): (1 - e) NLL + e (log Z - mean logit). ``nll_sum``
    stays the NLL's, so the reported loss is comparable with and without smoothing.
    With ``train.loss_chunk_len``, the model returns its ``VocabLogits`` and
    ``chunked_lm_loss`` computes the same loss ``loss_chunk_len`` positions at a time.
    """
    k = cfg.train.grad_accum_steps
    z_coef = cfg.train.z_loss
    smoothing = cfg.train.label_smoothing
    use_dropout = cfg.model.dropout > 0
    chunk_len = cfg.train.loss_chunk_len

    def objective(params, example, total_weight, rng):
        deferred = {"deferred": True} if chunk_len else {}
        outputs = model.apply(
            {"params": params}, **example["model"], deterministic=not use_dropout, rngs={"dropout": rng}, **deferred
        )
        lm, heads = outputs if isinstance(outputs, tuple) else (outputs, {})  # lm: logits, or VocabLogits
        weights = example["weights"]
        if chunk_len:
            value, nll_sum, z_sum = chunked_lm_loss(lm, example["targets"], weights, k / total_weight,
                                                    chunk_len=chunk_len, z_loss=z_coef, label_smoothing=smoothing)
        else:
            nll, log_z = token_losses(lm, example["targets"])
            nll_sum = jnp.sum(nll * weights)
            z_sum = jnp.sum(jnp.square(log_z) * weights)
            mean_logit = jnp.mean(lm.astype(jnp.float32), axis=-1) if smoothing else 0.0
            loss_sum = jnp.sum(smoothed_nll(nll, log_z, mean_logit, smoothing) * weights)
            value = (loss_sum + z_coef * z_sum) * (k / total_weight)
        head_sums = {}
        for name, head_logits in heads.items():
            head = example["heads"][name]
            head_nll, _ = token_losses(head_logits, head["targets"])
            head_sums[name] = jnp.sum(head_nll * head["weights"])
            value += head_sums[name] * (k / jnp.maximum(head["total"], 1.0))
        return value, (nll_sum, z_sum, head_sums)

    return objective


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule, cfg: Config, objective: Callable
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)`` for one global batch.

    ``objective(batch, rng) -> example`` is the family's (``Family.objective``); its draws
    (masks) come from a key of the seed and the step, so a resumed run draws the same.
    The loss is the token-weighted mean NLL over the whole global batch (plus z-loss).
    With ``grad_accum_steps = k`` the batch is cut into k micro-batches that a
    ``lax.scan`` feeds to ``optax.MultiSteps``; each micro-batch loss is scaled so that
    the k-gradient average equals the gradient of the whole-batch loss.
    """
    k = cfg.train.grad_accum_steps
    loss_of = make_objective(model, cfg)

    def grads_of(params, example, total_weight, rng):
        (_, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(params, example, total_weight, rng)
        return grads, sums

    def step(state: TrainState, batch: Batch):
        example = objective(batch, data_key(cfg.train.seed, state.step))
        total_weight = jnp.maximum(jnp.sum(example["weights"]), 1.0)
        rng = jax.random.fold_in(jax.random.key(cfg.train.seed, impl=cfg.train.dropout_rng), state.step)
        for head in example.get("heads", {}).values():  # whole-batch weights, before micro-batching
            head["total"] = jnp.sum(head["weights"])
        if k == 1:
            grads, (nll_sum, z_sum, head_sums) = grads_of(state.params, example, total_weight, rng)
            grad_norm = optax.global_norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        else:
            # [batch, ...] -> [k, batch / k, ...]; micro-batch i takes every k-th row, so
            # each device's rows stay on that device.
            micro = jax.tree.map(  # a head's whole-batch total goes to every micro-batch
                lambda x: jnp.broadcast_to(x, (k,)) if x.ndim == 0 else jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1),
                example)

            def micro_step(carry, inputs):
                params, opt_state = carry
                example_i, i = inputs
                grads, sums = grads_of(params, example_i, total_weight, jax.random.fold_in(rng, i))
                # Norm of the running mean MultiSteps accumulates; after the last
                # micro-batch it is the norm of the whole-batch gradient.
                seen = opt_state.mini_step.astype(jnp.float32)
                mean = jax.tree.map(lambda a, g: a * (seen / (seen + 1)) + g / (seen + 1), opt_state.acc_grads, grads)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), (*sums, optax.global_norm(mean))

            (params, opt_state), (nll_sums, z_sums, head_sums, norms) = jax.lax.scan(
                micro_step, (state.params, state.opt_state), (micro, jnp.arange(k))
            )
            nll_sum, z_sum, grad_norm = nll_sums.sum(), z_sums.sum(), norms[-1]
            head_sums = {name: sums.sum() for name, sums in head_sums.items()}
        loss = nll_sum / total_weight
        params_finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))
        skipped = skipped_updates(opt_state)
        metrics = {
            "loss": loss,
            "z_loss": z_sum / total_weight,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
            # Skipped updates do not advance the optimizer's schedule.
            "learning_rate": schedule(state.step - skipped_updates(state.opt_state)),
            "tokens": total_weight,
            "skipped_steps": skipped,
            "params_finite": params_finite,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite,
            **{f"{name}_loss": head_sums[name] / jnp.maximum(example["heads"][name]["total"], 1.0) for name in head_sums},
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def jit_train_step(step, state_shardings: TrainState, mesh: Mesh):
    """The train step jitted with explicit shardings; the old state is donated."""
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )
