"""Generation with a KV cache and continuous batching.

The engine owns a fixed number of decode slots, each a row of one preallocated KV cache
[layers, slots, context, kv_heads, head_dim]. ``add_many`` prefills prompts together,
each into a free slot (padded on the right to a bucket length, and their count to a
power of two, so only a few prefill shapes ever compile), and samples their first
tokens; ``step`` decodes one token for every busy slot at once. A request that finishes
frees its slot at once, and the next ``add_many`` fills it while the others keep
decoding: that is continuous batching, for ``generate`` below and for the HTTP server
alike.

A row's cache slot p holds the keys and values of its token at position p; a query at
position p reads slots 0..p. Nothing is recomputed, and padding never enters a result.
The cache is updated in place, and a step attends over the cache's first W slots only,
W the bucket of its longest row, so a step costs what the rows' lengths need rather than
the whole context (one decode program per bucket, ``warm_up`` compiles them all).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2x.config import ModelConfig
from t2x.infer.model import InferenceModel
from t2x.infer.sampling import Sampling, sample
from t2x.models import build_model
from t2x.parallel import sharding_context

MIN_BUCKET = 16


class RequestError(ValueError):
    """A request that cannot be served as given; ``field`` names what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass
class Completion:
    prompt: str
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # eos | stop | length

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Request:
    prompt: str
    ids: list[int]  # BOS + prompt tokens
    sampling: Sampling
    prefix: str = ""  # the prompt's tokens decoded: the text before the new tokens
    decode: Callable[[list[int]], str] | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cut: int | None = None  # where a stop string begins in the text
    _decoded: tuple[int, str] = (0, "")

    @property
    def text(self) -> str:
        """The new tokens' text, decoded when asked for (not at every step), and cut
        before a stop string."""
        if self._decoded[0] != len(self.generated):
            # Decoded after the prompt: a piece's leading space is kept (alone, it would
            # be dropped as SentencePiece drops the space it adds before a text).
            self._decoded = (len(self.generated), self.decode(self.ids[1:] + self.generated)[len(self.prefix) :])
        return self._decoded[1] if self.cut is None else self._decoded[1][: self.cut]


def bucket(n: int, context: int) -> int:
    """The padded length of ``n`` tokens: the smallest of ``buckets(context)`` that holds them."""
    return next(b for b in buckets(context) if b >= n)


def _doubling(first: int, last: int) -> list[int]:
    """first, 2 * first, 4 * first, ... below ``last``, and ``last``."""
    out, n = [], first
    while n < last:
        out.append(n)
        n *= 2
    return [*out, last]


def prefill_sizes(slots: int) -> list[int]:
    """Prompts prefilled together are padded to one of these counts."""
    return _doubling(1, slots)


def buckets(context: int) -> list[int]:
    """Padded lengths: powers of two from 16, and the context itself."""
    return _doubling(MIN_BUCKET, context)


@functools.cache
def _programs(cfg: ModelConfig, cache_sharding: jax.sharding.NamedSharding):
    """The jitted prefill and decode of a model config, shared by every engine of it.

    Both return the cache laid out as ``cache_sharding`` (``init_cache``'s), so the next
    call's inputs match what was compiled (a layout spelled otherwise would recompile).
    """
    module = build_model(cfg)

    def prefill(params, cache, rows, tokens, lengths, temperature, top_k, top_p, seeds):
        """Run [k, bucket] prompts into cache rows ``rows`` (written in place, attending
        over the first ``bucket`` slots; a row past the cache is padding, dropped); the
        first token of each."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, cache = module.apply({"params": params}, tokens, positions, cache=cache, rows=rows,
                                     window=tokens.shape[1], last=lengths - 1)
        counts = jnp.zeros(tokens.shape[0], jnp.int32)
        return cache, sample(logits[:, 0], temperature, top_k, top_p, seeds, counts)

    def decode(params, cache, tokens, positions, temperature, top_k, top_p, seeds, counts, window):
        """One token for every slot, attending over the cache's first ``window`` slots."""
        logits, cache = module.apply({"params": params}, tokens[:, None], positions[:, None], cache=cache,
                                     window=window)
        return cache, sample(logits[:, 0], temperature, top_k, top_p, seeds, counts)

    out = ({"k": cache_sharding, "v": cache_sharding}, None)
    return (jax.jit(prefill, donate_argnums=1, out_shardings=out),
            jax.jit(decode, donate_argnums=1, static_argnames="window", out_shardings=out))


class Engine:
    """Decode slots over one KV cache (see the module docstring).

    Args:
      model: the loaded model; ``slots`` must be a multiple of its ``batch_ways``.
      slots: sequences decoded together.
    """

    def __init__(self, model: InferenceModel, slots: int = 8):
        if not model.generates:
            what = "a classifier" if model.classifies else f"an {model.cfg.model.family}"
            raise RequestError("model", f"only a decoder language model generates text; this is {what}")
        if slots < 1 or slots % model.batch_ways:
            raise ValueError(f"slots ({slots}) must be a positive multiple of the {model.batch_ways} batch devices")
        self.model, self.slots, self.context = model, slots, model.context
        self.buckets = buckets(self.context)
        self.cache = model.init_cache(slots, self.context)
        self.requests: list[_Request | None] = [None] * slots
        self.tokens = np.zeros(slots, np.int32)  # each slot's latest token, fed next
        self.positions = np.zeros(slots, np.int32)  # where that token goes
        self.temperature = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.seeds = np.zeros(slots, np.uint32)
        self._prefill, self._decode = _programs(model.cfg.model, model.cache_sharding(slots, self.context))

    # Requests.

    def encode(self, prompt: str, sampling: Sampling) -> _Request:
        """Check a request and tokenize its prompt (BOS first)."""
        for field, problem in sampling.problems():
            raise RequestError(field, problem)
        if sampling.num_beams > 1:
            raise RequestError("num_beams", "beam search decodes encoder-decoders; a decoder language model samples "
                               "or decodes greedily (num_beams 1)")
        ids = [self.model.tokenizer.bos_id, *self.model.tokenizer.encode([prompt])[0]]
        if len(ids) >= self.context:
            raise RequestError(
                "prompt", f"is {len(ids) - 1} tokens; the model's context holds {self.context - 2} prompt tokens "
                "and at least one new token"
            )
        tokenizer = self.model.tokenizer
        return _Request(prompt, ids, sampling, tokenizer.decode(ids[1:]), tokenizer.decode)

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.requests) if r is None]

    def busy(self) -> bool:
        return any(r is not None for r in self.requests)

    def add(self, request: _Request) -> int:
        """Prefill ``request`` into a free slot and sample its first token; returns the slot."""
        return self.add_many([request])[0]

    def add_many(self, requests: Sequence[_Request]) -> list[int]:
        """Prefill ``requests`` (at most as many as free slots) together, one free slot
        each, and sample their first tokens; returns their slots."""
        slots = self.free_slots()[: len(requests)]
        if len(slots) < len(requests):
            raise ValueError(f"{len(requests)} requests for {len(slots)} free slots")
        k = next(size for size in prefill_sizes(self.slots) if size >= len(requests))
        length = bucket(max(len(r.ids) for r in requests), self.context)
        tokens, lengths = np.zeros((k, length), np.int32), np.ones(k, np.int32)
        rows = np.full(k, self.slots, np.int32)  # past the cache: padding, never written
        for i, (slot, r) in enumerate(zip(slots, requests)):
            tokens[i, : len(r.ids)], lengths[i], rows[i] = r.ids, len(r.ids), slot
            s = r.sampling
            self.temperature[slot], self.top_k[slot], self.top_p[slot], self.seeds[slot] = (
                s.temperature, s.top_k, s.top_p, s.seed)
        settings = [np.append(a, np.array(greedy, a.dtype))[rows]  # padding rows (index slots): greedy
                    for a, greedy in ((self.temperature, 0.0), (self.top_k, 0), (self.top_p, 1.0), (self.seeds, 0))]
        with sharding_context(self.model.mesh):
            self.cache, first = self._prefill(self.model.params, self.cache, rows, tokens, lengths, *settings)
        first = np.asarray(jax.device_get(first))
        for i, (slot, r) in enumerate(zip(slots, requests)):
            self.requests[slot] = r
            self.positions[slot] = len(r.ids)
            self._accept(slot, int(first[i]))
        return slots

    def step(self) -> list[int]:
        """Decode one token for every busy slot; returns the slots that finished."""
        busy = [i for i, r in enumerate(self.requests) if r is not None]
        counts = np.array([len(r.generated) if r else 0 for r in self.requests], np.int32)
        positions = np.where([r is not None for r in self.requests], self.positions, 0).astype(np.int32)
        with sharding_context(self.model.mesh):
            self.cache, tokens = self._decode(
                self.model.params, self.cache, self.tokens, positions, self.temperature, self.top_k, self.top_p,
                self.seeds, counts, window=bucket(int(positions.max()) + 1, self.context),
            )
        tokens = np.asarray(jax.device_get(tokens))
        finished = []
        for slot in busy:
            self.positions[slot] += 1
            if self._accept(slot, int(tokens[slot])):
                finished.append(slot)
        return finished

    def warm_up(self) -> None:
        """Compile every program a request can need: the prefill of each number of prompts
        (``prefill_sizes``) at each bucket length, and the decode step at each window (the
        same lengths). Call it before adding requests: it writes into the cache."""
        idle = np.zeros(self.slots, np.int32)
        with sharding_context(self.model.mesh):
            for n in self.buckets:
                for k in prefill_sizes(self.slots):
                    rows, ones = np.arange(k, dtype=np.int32), np.ones(k, np.int32)
                    self.cache, _ = self._prefill(self.model.params, self.cache, rows, np.zeros((k, n), np.int32), ones,
                                                  self.temperature[:k], self.top_k[:k], self.top_p[:k], self.seeds[:k])
                self.cache, _ = self._decode(self.model.params, self.cache, idle, idle, self.temperature, self.top_k,
                                             self.top_p, self.seeds, idle, window=n)
        jax.block_until_ready(self.cache)

    def _accept(self, slot: int, token: int) -> bool:
        """Record a sampled token; free the slot when its request is done."""
        request = self.requests[slot]
        tokenizer = self.model.tokenizer
        if token == tokenizer.eos_id:
            request.finish_reason = "eos"
        else:
            request.generated.append(token)
            hits = [i for i in (request.text.find(s) for s in request.sampling.stop) if i >= 0]
            if hits:
                request.cut = min(hits)
                request.finish_reason = "stop"
            elif len(request.generated) >= request.sampling.max_new_tokens or self.positions[slot] >= self.context:
                request.finish_reason = "length"
        self.tokens[slot] = token
        if request.finish_reason is None:
            return False
        self.release(slot)
        return True

    def release(self, slot: int) -> None:
        """Free a slot (its request finished, or its client went away) and make it greedy
        again: while any row samples, every decode step takes the (slower) sampling path."""
        self.requests[slot] = None
        self.temperature[slot], self.top_k[slot], self.top_p[slot], self.seeds[slot] = 0.0, 0, 1.0, 0

    def take(self, slot_request: _Request) -> Completion:
        r = slot_request
        return Completion(r.prompt, r.text, r.generated, len(r.ids) - 1, r.finish_reason)


def generate(
    model: InferenceModel,
    prompts: Sequence[str],
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    slots: int | None = None,
    on_token: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Complete each prompt, decoding up to ``slots`` of them at a time.

    Args:
      model: the loaded model.
      prompts: texts to continue (an encoder-decoder's inputs: ``seq2seq.Seq2Seq``
        decodes them, a whole batch in one program, so ``on_token`` hears each output once).
      sampling: settings for all prompts, or one per prompt.
      slots: decode slots (default: as many as prompts, rounded up to the batch devices,
        at most 32).
      on_token: called with (prompt index, text so far) after each new token.

    Raises:
      RequestError: a prompt is too long or a setting is out of range.
    """
    settings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
    if len(settings) != len(prompts):
        raise ValueError("give one Sampling, or one per prompt")
    if model.translates:
        from t2x.infer.seq2seq import Seq2Seq

        completions = Seq2Seq(model, slots or 8).generate(prompts, settings)
        for i, c in enumerate(completions):
            if on_token:
                on_token(i, c.text)
        return completions
    ways = model.batch_ways
    slots = slots or -(-min(max(len(prompts), 1), 32) // ways) * ways
    engine = Engine(model, slots)
    requests = [engine.encode(p, s) for p, s in zip(prompts, settings)]
    waiting: deque[int] = deque(range(len(requests)))
    owner: dict[int, int] = {}
    done: dict[int, Completion] = {}

    def fill():
        admitted = [waiting.popleft() for _ in range(min(len(waiting), len(engine.free_slots())))]
        if not admitted:
            return
        for i, slot in zip(admitted, engine.add_many([requests[i] for i in admitted])):
            if engine.requests[slot] is None:  # finished on its first token
                done[i] = engine.take(requests[i])
            else:
                owner[slot] = i
            if on_token:
                on_token(i, requests[i].text)

    fill()
    while engine.busy():
        finished = engine.step()
        if on_token:
            for slot, i in owner.items():
                on_token(i, requests[i].text)
        for slot in finished:
            i = owner.pop(slot)
            done[i] = engine.take(requests[i])
        fill()
    return [done[i] for i in range(len(requests))]


def read_prompts(lines: Iterable[str]) -> list[str]:
    """Prompts of a prompt file: one per line, or JSON lines with a "prompt" field."""
    import json

    prompts = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                value = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                raise RequestError("prompt-file", f"line {n} is not a JSON object with a \"prompt\" string") from None
            if not isinstance(value, str):
                raise RequestError("prompt-file", f"line {n}: \"prompt\" must be a string")
            prompts.append(value)
        else:
            prompts.append(line.replace("\\n", "\n"))
    return prompts
