"""Generation for encoder-decoders: greedy, sampled or beam search.

A batch of inputs is encoded once; the decoder then runs one token per step with
``EncoderDecoder``'s cache: self-attention keys and values at each target position, and
the cross-attention keys and values of the encoder states, written on the first step and
read on every step after. The whole loop is one jitted program, a ``lax.while_loop``
that ends when every row has finished, compiled once per (rows, input length bucket,
output length bucket, beams).

Greedy and sampled decoding take the decoder family's ``Sampling`` (temperature, top-k,
top-p, seed, stop strings) and its ``sample``, so a row's output does not depend on the
rows it shares a batch with. Beam search keeps ``num_beams`` hypotheses per input, ranks
finished ones by log-probability over the GNMT length penalty ((5 + length) / 6) **
``length_penalty`` (0.6 by default, as T5X), and stops when no live hypothesis can still
beat the worst finished one.

An input is read as the model was trained on it: its tokens then EOS; the decoder starts
from BOS (the start token of teacher forcing) and stops at EOS. A model pretrained with
span corruption reads ``<extra_id_0>``, ``<extra_id_1>``, ... in an input as its
sentinel ids (as T5 writes them) and writes them so in its output: "The <extra_id_0>
sat on the <extra_id_1>." is answered with each sentinel and the span it stands for.
The sentinels are the tokenizer's own ``<extra_id_k>`` tokens when it has them (an
imported T5's), else the ids past its vocabulary that span corruption gave them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2x.config import ModelConfig
from t2x.families import sentinel_ids
from t2x.infer.engine import Completion, RequestError, bucket, buckets, prefill_sizes
from t2x.infer.model import InferenceModel
from t2x.infer.sampling import Sampling, sample
from t2x.models.encdec import EncoderDecoder, init_cache
from t2x.parallel import sharding_context

_FLOOR = -1e9  # the score of an empty hypothesis: below any real one, and safe to add to
SENTINEL = re.compile(r"<extra_id_(\d+)>")


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT's length normalizer ((5 + length) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


@functools.cache
def _programs(cfg: ModelConfig, bos: int, eos: int):
    """The jitted sampled and beam-search loops of a model config."""
    module = EncoderDecoder(cfg)

    def start(params, tokens, segment_ids, rows: int, steps: int):
        """Encode; then the first decoder step (BOS at position 0), which writes the
        cross-attention keys and values. Returns a step function and the first log-probs."""
        apply = functools.partial(module.apply, {"params": params}, method="decode")
        encoded = module.apply({"params": params}, tokens, None, segment_ids, method="encode")
        repeat = rows // tokens.shape[0]  # beams per input
        encoded, segment_ids = jnp.repeat(encoded, repeat, axis=0), jnp.repeat(segment_ids, repeat, axis=0)

        def step(token, position, cache, encoded=None):
            positions = jnp.full((rows, 1), position, jnp.int32)
            logits, cache = apply(token[:, None], encoded, segment_ids, positions, cache=cache)
            return logits[:, 0].astype(jnp.float32), cache

        cache = init_cache(cfg, rows, steps, tokens.shape[1])
        logits, cache = step(jnp.full((rows,), bos, jnp.int32), 0, cache, encoded)
        return step, logits, cache

    def sampled(params, tokens, segment_ids, limits, temperature, top_k, top_p, seeds, steps):
        """[rows, steps] tokens per row: each row's first ``limits`` tokens are real, and
        after its first EOS every token is EOS."""
        rows = tokens.shape[0]
        step, logits, cache = start(params, tokens, segment_ids, rows, steps)

        def draw(logits, count):
            return sample(logits, temperature, top_k, top_p, seeds, jnp.full((rows,), count, jnp.int32))

        first = draw(logits, 0)
        out = jnp.full((rows, steps), eos, jnp.int32).at[:, 0].set(first)

        def going(carry):
            i, _, _, _, done = carry
            return (i < steps) & ~jnp.all(done)

        def body(carry):
            i, token, cache, out, done = carry
            logits, cache = step(token, i, cache)
            token = jnp.where(done, eos, draw(logits, i))
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
            return i + 1, token, cache, out, done | (token == eos) | (i + 1 >= limits)

        done = (first == eos) | (limits <= 1)
        return jax.lax.while_loop(going, body, (1, first, cache, out, done))[3]

    def beam(params, tokens, segment_ids, limits, beams, alpha, steps):
        """The best hypothesis of each input [inputs, steps] (after its EOS, EOS) and
        whether it finished with EOS [inputs]."""
        n, k, vocab = tokens.shape[0], beams, cfg.vocab_size
        step, logits, cache = start(params, tokens, segment_ids, n * k, steps)
        limit_penalty = length_penalty(limits.astype(jnp.float32), alpha)  # the largest a row can reach

        def advance(i, logits, state):
            """Extend every live hypothesis by every token; keep the k best finished and
            the k best live ones. Rows past their limit keep their state."""
            alive, alive_score, done_seq, done_score, _, stopped = state
            log_probs = jax.nn.log_softmax(logits).reshape(n, k, vocab)
            scores, index = jax.lax.top_k((alive_score[:, :, None] + log_probs).reshape(n, k * vocab), 2 * k)
            source, token = index // vocab, (index % vocab).astype(jnp.int32)
            seqs = jnp.take_along_axis(alive, source[:, :, None], axis=1).at[:, :, i].set(token)
            ended = token == eos
            finished_scores = jnp.where(ended, scores / length_penalty(i + 1.0, alpha), _FLOOR)
            pool_score = jnp.concatenate([done_score, finished_scores], axis=1)
            best, pick = jax.lax.top_k(pool_score, k)
            new_done_seq = jnp.take_along_axis(jnp.concatenate([done_seq, seqs], axis=1), pick[:, :, None], axis=1)
            # A hypothesis that reaches the row's limit without EOS stays live: it is the
            # answer if none finished.
            live_score, keep = jax.lax.top_k(jnp.where(ended, _FLOOR, scores), k)
            new_alive = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
            parents = jnp.take_along_axis(source, keep, axis=1)
            last = jnp.take_along_axis(token, keep, axis=1)
            hold = stopped[:, None]
            new = (jnp.where(hold[:, :, None], alive, new_alive), jnp.where(hold, alive_score, live_score),
                   jnp.where(hold[:, :, None], done_seq, new_done_seq), jnp.where(hold, done_score, best))
            parents = jnp.where(hold, jnp.arange(k)[None], parents)
            # Finished: at the limit, or no live hypothesis can beat the worst finished one.
            hopeless = new[1][:, 0] / limit_penalty < new[3][:, -1]
            stopped = stopped | (i + 1 >= limits) | hopeless
            return (*new, last.reshape(-1), stopped), (jnp.arange(n)[:, None] * k + parents).reshape(-1)

        seqs = jnp.full((n, k, steps), eos, jnp.int32)
        floor = jnp.full((n, k), _FLOOR, jnp.float32)
        # At the start every beam is BOS: only the first one's extensions count.
        state = (seqs, floor.at[:, 0].set(0.0), seqs, floor, jnp.zeros(n * k, jnp.int32), jnp.zeros(n, bool))
        state, _ = advance(0, logits, state)  # every row of the cache holds the same BOS: nothing to reorder

        def going(carry):
            i, state, _ = carry
            return (i < steps) & ~jnp.all(state[-1])

        def body(carry):
            i, state, cache = carry
            logits, cache = step(state[4], i, cache)
            state, parents = advance(i, logits, state)
            # Each kept hypothesis takes its parent's self-attention cache; the
            # cross-attention keys and values are the same for every beam of an input.
            cache = {**cache, "k": cache["k"][:, parents], "v": cache["v"][:, parents]}
            return i + 1, state, cache

        _, (alive, alive_score, done_seq, done_score, _, _), _ = jax.lax.while_loop(going, body, (1, state, cache))
        finished = done_score[:, 0] > _FLOOR / 2
        best = jnp.where(finished[:, None], done_seq[:, 0], alive[:, 0])
        return best, finished

    return (jax.jit(sampled, static_argnames="steps"),
            jax.jit(beam, static_argnames=("beams", "alpha", "steps")))


class Seq2Seq:
    """Generation for an encoder-decoder (see the module docstring).

    Args:
      model: the loaded encoder-decoder.
      batch_size: inputs decoded together at most (rounded up to the batch devices);
        with beam search, each input's beams count as rows too.
    """

    def __init__(self, model: InferenceModel, batch_size: int = 8):
        if model.cfg.model.family != "encoder_decoder" or model.classifies:
            raise RequestError("model", "Seq2Seq decodes encoder-decoders")
        self.model = model
        ways = model.batch_ways
        self.batch_size = -(-batch_size // ways) * ways
        tok = model.tokenizer
        self._sampled, self._beam = _programs(model.cfg.model, tok.bos_id, tok.eos_id)
        self.sentinels = sentinel_ids(model.cfg, tok)  # id of <extra_id_k>
        self._sentinel_of = {i: k for k, i in enumerate(self.sentinels)}

    def check(self, sampling: Sampling) -> None:
        """Refuse settings out of range, naming the field."""
        for field, problem in sampling.problems():
            raise RequestError(field, problem)
        if sampling.num_beams > 1 and sampling.temperature > 0:
            raise RequestError("temperature", "beam search is deterministic: set temperature 0, or num_beams 1 to sample")

    def inputs(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's encoder row: its tokens, then EOS."""
        tok, context = self.model.tokenizer, self.model.context
        out = []
        for i, ids in enumerate(self._encode(t) for t in texts):
            if len(ids) + 1 > context:
                raise RequestError("prompt" if len(texts) == 1 else f"prompts.{i}",
                                   f"is {len(ids)} tokens; the encoder reads at most {context - 1} and EOS")
            out.append([*ids, tok.eos_id])
        return out

    def _encode(self, text: str) -> list[int]:
        """Token ids of ``text``, each ``<extra_id_k>`` the k-th sentinel's id."""
        if not self.sentinels:
            return self.model.tokenizer.encode([text])[0]
        parts = SENTINEL.split(text)  # text, k, text, k, ..., text
        ids = []
        for n, part in enumerate(parts):
            if n % 2:
                k = int(part)
                if k >= len(self.sentinels):
                    raise RequestError("prompt", f"<extra_id_{k}>: the model has sentinels 0 to {len(self.sentinels) - 1}")
                ids.append(self.sentinels[k])
            elif part:
                ids.extend(self.model.tokenizer.encode([part])[0])
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of output ``tokens``: sentinels as ``<extra_id_k>``; ids past the
        tokenizer's vocabulary that are no sentinel (padding of the model's) as nothing."""
        tok, text, run = self.model.tokenizer, [], []
        for t in tokens:
            if t < tok.vocab_size and t not in self._sentinel_of:
                run.append(t)
                continue
            text.append(tok.decode(run))
            run = []
            if t in self._sentinel_of:
                text.append(f"<extra_id_{self._sentinel_of[t]}>")
        return "".join([*text, tok.decode(run)])

    def generate(self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling] = Sampling()) -> list[Completion]:
        """The output of each input text.

        Raises:
          RequestError: an input too long for the encoder, or a setting out of range.
        """
        settings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(settings) != len(prompts):
            raise ValueError("give one Sampling, or one per prompt")
        for s in settings:
            self.check(s)
        rows = self.inputs(prompts)
        out: list[Completion | None] = [None] * len(prompts)
        # Beam widths and penalties are compiled in: one batch per (beams, penalty).
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(settings):
            groups.setdefault((s.num_beams, s.length_penalty if s.num_beams > 1 else 0.0), []).append(i)
        for (beams, alpha), members in groups.items():
            per_batch = max(1, self.batch_size // beams)
            for first in range(0, len(members), per_batch):
                chunk = members[first : first + per_batch]
                for i, completion in zip(chunk, self._run([prompts[i] for i in chunk], [rows[i] for i in chunk],
                                                          [settings[i] for i in chunk], beams, alpha)):
                    out[i] = completion
        return out

    def warm_up(self, max_new_tokens: int = 64) -> None:
        """Compile greedy and sampled decoding to ``max_new_tokens`` for every batch size
        and input length bucket; other output lengths and beam widths compile when first
        asked for."""
        for length in buckets(self.model.context):
            for n in self._sizes(self.batch_size):
                self._run([""] * n, [[0] * length] * n, [Sampling(max_new_tokens)] * n, 1, 0.0)

    def _sizes(self, rows: int) -> list[int]:
        """The padded batch sizes ``rows`` inputs may take."""
        ways = self.model.batch_ways
        return sorted({-(-size // ways) * ways for size in prefill_sizes(max(self.batch_size, rows))})

    def _run(self, prompts, rows, settings, beams, alpha) -> list[Completion]:
        context = self.model.context
        n = next(size for size in self._sizes(len(rows)) if size >= len(rows))
        length = bucket(max(len(r) for r in rows), context)
        limits = np.ones(n, np.int32)
        for i, s in enumerate(settings):
            limits[i] = min(s.max_new_tokens, context)
        steps = bucket(int(limits.max()), context)
        tokens, segment_ids = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)], segment_ids[i, : len(ids)] = ids, 1
        with sharding_context(self.model.mesh):
            if beams > 1:
                best, _ = self._beam(self.model.params, tokens, segment_ids, limits, beams, alpha, steps)
            else:
                def column(field, padding, dtype):  # padding rows decode greedily
                    return np.array([getattr(s, field) for s in settings] + [padding] * (n - len(rows)), dtype)

                best = self._sampled(self.model.params, tokens, segment_ids, limits, column("temperature", 0.0, np.float32),
                                     column("top_k", 0, np.int32), column("top_p", 1.0, np.float32),
                                     column("seed", 0, np.uint32), steps)
            best = np.asarray(jax.device_get(best))
        return [self._completion(prompts[i], rows[i], best[i, : limits[i]], settings[i]) for i in range(len(rows))]

    def _completion(self, prompt: str, ids: list[int], tokens: np.ndarray, sampling: Sampling) -> Completion:
        eos = self.model.tokenizer.eos_id
        tokens = [int(t) for t in tokens]
        reason = "length"
        if eos in tokens:
            tokens, reason = tokens[: tokens.index(eos)], "eos"
        text = self.decode(tokens)
        if any(s in text for s in sampling.stop):
            # As the decoder family stops: at the first token whose text holds a stop string.
            n = next(n for n in range(1, len(tokens) + 1) if any(s in self.decode(tokens[:n]) for s in sampling.stop))
            tokens, text = tokens[:n], self.decode(tokens[:n])
            text, reason = text[: min(i for i in (text.find(s) for s in sampling.stop) if i >= 0)], "stop"
        return Completion(prompt, text, tokens, len(ids) - 1, reason)
