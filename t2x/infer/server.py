"""The HTTP server: FastAPI on uvicorn, with continuous batching.

One worker thread owns the model and runs everything on it, so requests never contend
for the devices:

- **generate**: a fixed number of decode slots (``Engine``). A new request is prefilled
  into a free slot and joins the running batch at the next decode step; a finished or
  abandoned request frees its slot at once.
- **score**, **embed** and **classify**: requests that arrive within ``batch_wait_ms``
  of each other (up to ``max_batch`` texts) run as one batch, between decode steps.
- **generate** from an encoder-decoder: batched the same way, each batch decoded whole
  by ``Seq2Seq`` (greedy, sampled or beam search); a streamed request gets its text in
  one event, then the result.

A decoder language model generates, scores and embeds; an encoder embeds; an
encoder-decoder generates and embeds (its encoder's states); a fine-tuned classifier
classifies. A request for what the
model does not do gets a 422.

Prompts are padded to bucket lengths (16, 32, ... up to the context) and batches to
fixed sizes, so after ``warm_up`` nothing compiles per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import threading
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2x.config import to_dict
from t2x.infer.engine import Engine, RequestError
from t2x.infer.model import InferenceModel
from t2x.infer.sampling import Sampling
from t2x.infer.score import POOLINGS, Scorer
from t2x.infer.seq2seq import Seq2Seq

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts; requests beyond these get a 4xx naming the field."""

    slots: int = 8  # sequences decoded at once
    max_batch: int = 16  # texts per score or embed batch
    batch_wait_ms: float = 5.0  # how long a score or embed batch waits for more requests
    max_body_bytes: int = 1 << 20
    max_texts: int = 64  # per score or embed request
    max_new_tokens: int = 512
    max_queue: int = 1024  # requests waiting; beyond it, 503


# Request bodies. Strict: "5" is not a number, and unknown fields are refused.

class GenerateBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: str = Field(min_length=1)
    max_new_tokens: int | None = None  # None: 64, or the server's limit if lower
    temperature: float = 0.0
    top_k: int = Field(0, lt=2**31)  # an int32 on the device
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = Field(default_factory=list, max_length=16)
    stream: bool = False
    num_beams: int = 1  # beam search (encoder-decoders)
    length_penalty: float = 0.6


class ScoreBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    texts: list[str] = Field(min_length=1)
    eos: bool = False


class EmbedBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    texts: list[str] = Field(min_length=1)
    pooling: Literal["mean", "last", "cls", "max"] = "mean"  # decoders: mean, last, max; encoders: cls, mean, max
    normalize: bool = False


class ClassifyBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    texts: list[str] = Field(min_length=1)


@dataclasses.dataclass(frozen=True)
class _Translation:
    """An encoder-decoder's generate request, batched as texts are."""

    prompt: str
    sampling: Sampling

    @property
    def texts(self) -> list[str]:
        return [self.prompt]


@dataclasses.dataclass
class _Job:
    kind: str  # generate | translate | score | embed | classify
    payload: Any
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    events: asyncio.Queue | None = None  # streamed generation: text deltas
    cancelled: bool = False
    sent: int = 0  # characters of text streamed so far

    def finish(self, result: Any) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.done, result)

    def emit(self, event: dict) -> None:
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class Worker:
    """The thread that owns the model: decode slots, then score and embed batches."""

    def __init__(self, model: InferenceModel, limits: Limits):
        self.model, self.limits = model, limits
        self.engine = Engine(model, limits.slots) if model.generates else None  # decoders generate
        self.seq2seq = Seq2Seq(model, limits.slots) if model.translates else None  # and encoder-decoders
        self.scorer = Scorer(model, batch_size=limits.max_batch)
        self.jobs: queue.Queue[_Job] = queue.Queue(maxsize=limits.max_queue)
        self.waiting: list[_Job] = []  # generate jobs waiting for a slot
        self.owners: dict[int, _Job] = {}  # slot -> job
        self.thread = threading.Thread(target=self._run, name="t2x-serve", daemon=True)
        self.stopping = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(timeout=30)

    def warm_up(self) -> None:
        """Compile every shape a request can need: prefill and decode (``Engine.warm_up``),
        and each score and embed (or classify) bucket; an encoder-decoder's sampled
        decoding (``Seq2Seq.warm_up``)."""
        if self.engine is not None:
            self.engine.warm_up()
        if self.seq2seq is not None:
            self.seq2seq.warm_up(min(64, self.limits.max_new_tokens))
        text = "x"
        while True:
            if self.model.generates:
                self.scorer.score([text])
            if self.model.classifies:
                self.scorer.classify([text])
            else:
                self.scorer.embed([text])
            if len(self.model.tokenizer.encode([text])[0]) + 1 >= self.model.context:
                break
            text = text * 2

    # The loop.

    def _run(self) -> None:
        while not self.stopping:
            generating = self.engine is not None and self.engine.busy()
            self._take_jobs(block=not generating and not self.waiting)
            batch = [j for j in self.waiting if j.kind != "generate"]
            if batch:
                self._batch(batch)
            if self.engine is not None:
                self._admit()
                if self.engine.busy():
                    self._step()

    def _take_jobs(self, block: bool) -> None:
        try:
            job = self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
        except queue.Empty:
            return
        self.waiting.append(job)
        if job.kind != "generate":  # a score or embed batch waits briefly for more
            deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    self.waiting.append(self.jobs.get(timeout=remaining))
                except queue.Empty:
                    break
        while True:
            try:
                self.waiting.append(self.jobs.get_nowait())
            except queue.Empty:
                return

    def _batch(self, jobs: list[_Job]) -> None:
        """Score, embed or classify the waiting requests together, up to max_batch texts per kind."""
        for kind in ("score", "embed", "classify", "translate"):
            group = [j for j in jobs if j.kind == kind and not j.cancelled]
            while group:
                taken, texts = [], 0
                while group and (not taken or texts + len(group[0].payload.texts) <= self.limits.max_batch):
                    taken.append(group.pop(0))
                    texts += len(taken[-1].payload.texts)
                self._run_batch(kind, taken)
        self.waiting = [j for j in self.waiting if j.kind == "generate"]

    def _run_batch(self, kind: str, jobs: list[_Job]) -> None:
        texts = [t for j in jobs for t in j.payload.texts]
        try:
            if kind == "translate":
                outputs = self.seq2seq.generate(texts, [j.payload.sampling for j in jobs])
                for j, output in zip(jobs, outputs):
                    result = output.to_json()
                    del result["prompt"]
                    j.emit({"text": output.text})
                    j.finish(result)
                return
            if kind == "score":
                eos = [j.payload.eos for j in jobs]
                results: list = []
                for flag in (False, True):  # requests with and without EOS scoring
                    picked = [t for j, e in zip(jobs, eos) if e == flag for t in j.payload.texts]
                    results.append(iter(self.scorer.score(picked, eos=flag)) if picked else iter(()))
                for j, e in zip(jobs, eos):
                    j.finish({"scores": [next(results[int(e)]).to_json() for _ in j.payload.texts]})
                return
            if kind == "classify":
                classes = iter(self.scorer.classify(texts))
                for j in jobs:
                    j.finish({"classes": [next(classes) for _ in j.payload.texts]})
                return
            for key in sorted({(j.payload.pooling, j.payload.normalize) for j in jobs}):
                same = [j for j in jobs if (j.payload.pooling, j.payload.normalize) == key]
                vectors = iter(self.scorer.embed([t for j in same for t in j.payload.texts], *key))
                for j in same:
                    j.finish({"embeddings": [next(vectors).tolist() for _ in j.payload.texts],
                              "dim": self.model.cfg.model.d_model})
        except RequestError as e:
            for j in jobs:
                j.finish(e)
        except Exception as e:  # a failure of the model itself: every request in it gets a 500
            log.exception("%s batch of %d texts failed", kind, len(texts))
            for j in jobs:
                j.finish(e)

    def _admit(self) -> None:
        """Prefill waiting generate requests into free slots, together."""
        jobs = [j for j in self.waiting if j.kind == "generate" and not j.cancelled][: len(self.engine.free_slots())]
        for job in [j for j in self.waiting if j.kind == "generate" and (j.cancelled or j in jobs)]:
            self.waiting.remove(job)
        if not jobs:
            return
        try:
            slots = self.engine.add_many([job.payload for job in jobs])
        except Exception as e:
            if len(jobs) == 1:
                return self._prefill_failed(jobs[0], e)
            slots = [self._admit_one(job) for job in jobs]  # find the request that fails
        for job, slot in zip(jobs, slots):
            if slot is None:
                continue
            self._emit(job, job.payload)
            if self.engine.requests[slot] is None:
                self._complete(job, job.payload)
            else:
                self.owners[slot] = job

    def _admit_one(self, job: _Job) -> int | None:
        try:
            return self.engine.add(job.payload)
        except Exception as e:
            return self._prefill_failed(job, e)

    @staticmethod
    def _prefill_failed(job: _Job, error: Exception) -> None:
        """A request whose prefill fails gets a 500; the worker and the other slots go on."""
        log.error("prefill of a %d-token prompt failed: %r", len(job.payload.ids), error)
        job.finish(error)

    def _step(self) -> None:
        for slot, job in list(self.owners.items()):
            if job.cancelled:  # the client went away: free its slot now
                self.engine.release(slot)
                del self.owners[slot]
        if not self.engine.busy():
            return
        finished = self.engine.step()
        for slot, job in list(self.owners.items()):
            self._emit(job, job.payload)
            if slot in finished:
                del self.owners[slot]
                self._complete(job, job.payload)

    def _emit(self, job: _Job, request, final: bool = False) -> None:
        """Stream the new text, holding back a trailing U+FFFD until the token that
        completes its UTF-8 character arrives (byte-fallback pieces come a byte at a time)."""
        text = request.text if final else request.text.rstrip("\ufffd")
        if job.events is not None and len(text) > job.sent:
            job.emit({"text": text[job.sent :]})
            job.sent = len(text)

    def _complete(self, job: _Job, request) -> None:
        self._emit(job, request, final=True)
        result = self.engine.take(request).to_json()
        del result["prompt"]
        job.finish(result)


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status)


class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes (declared or sent) gets a 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = _error(413, "body", f"the request body is over {self.limit} bytes")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_big(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


def build_app(model: InferenceModel, limits: Limits = Limits(), worker: Worker | None = None) -> FastAPI:
    """The ASGI app. Its worker starts with the app and stops with it."""
    worker = worker or Worker(model, limits)

    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="t2x", description="Generate, score, embed and classify with a t2x model.", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, "body", "the body is not valid JSON")
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(422, field, first.get("msg", "invalid"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        field = {400: "body", 404: "path", 405: "method"}.get(exc.status_code, "request")
        detail = "the body is not valid UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
        return _error(exc.status_code, field, detail)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return _error(422, exc.field, str(exc).split(": ", 1)[-1])

    @app.middleware("http")
    async def json_only(request: Request, call_next):
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "content-type", "send the body as application/json")
        return await call_next(request)

    def submit(kind: str, payload: Any, stream: bool = False) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(kind, payload, loop, loop.create_future(), asyncio.Queue() if stream else None)
        try:
            worker.jobs.put_nowait(job)
        except queue.Full:
            raise _Busy from None
        return job

    @app.exception_handler(_Busy)
    async def busy(request: Request, exc: _Busy):
        return _error(503, "request", "the server is at its queue limit; retry later")

    async def wait(job: _Job, request: Request):
        """The job's result; abandoned if the client disconnects first."""
        while True:
            done, _ = await asyncio.wait({job.done}, timeout=0.5)
            if done:
                return job.done.result()
            if await request.is_disconnected():
                job.cancelled = True
                return JSONResponse({}, status_code=499)  # nobody reads it

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def describe():
        return {"config": to_dict(model.cfg), "source": model.source, "context": model.context,
                "limits": dataclasses.asdict(limits)}

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request):
        """Continue a prompt (a decoder) or answer an input (an encoder-decoder). With
        "stream": true, server-sent events: {"text": ...} per new piece of text (an
        encoder-decoder's whole text in one), then {"done": true, ...the result}."""
        if worker.engine is None and worker.seq2seq is None:
            raise RequestError("model", "this model does not generate: a decoder language model or an "
                               "encoder-decoder does")
        wanted = min(64, limits.max_new_tokens) if body.max_new_tokens is None else body.max_new_tokens
        sampling = Sampling(wanted, body.temperature, body.top_k, body.top_p, body.seed, tuple(body.stop),
                            body.num_beams, body.length_penalty)
        for field, problem in sampling.problems(limits.max_new_tokens):
            raise RequestError(field, problem)
        if worker.seq2seq is not None:
            worker.seq2seq.check(sampling)
            _check_texts([body.prompt], limits)
            worker.seq2seq.inputs([body.prompt])  # too long, or an unknown sentinel: a 422 now
            job = submit("translate", _Translation(body.prompt, sampling), stream=body.stream)
        else:
            job = submit("generate", worker.engine.encode(body.prompt, sampling), stream=body.stream)
        if not body.stream:
            return await wait(job, request)

        async def events():
            try:
                while True:
                    getter = asyncio.ensure_future(job.events.get())
                    done, _ = await asyncio.wait({getter, job.done}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        yield f"data: {json.dumps(getter.result())}\n\n"
                        continue
                    getter.cancel()
                    while not job.events.empty():
                        yield f"data: {json.dumps(job.events.get_nowait())}\n\n"
                    yield f"data: {json.dumps({'done': True, **job.done.result()})}\n\n"
                    return
            finally:
                job.cancelled = job.cancelled or not job.done.done()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/score")
    async def score(body: ScoreBody, request: Request):
        """Log-likelihood, tokens, bytes, perplexity and bits per byte of each text."""
        if not model.generates:
            raise RequestError("model", "this model does not score texts: only a decoder language model does")
        _check_texts(body.texts, limits)
        for i, text in enumerate(body.texts):
            if not text and not body.eos:  # no token: its perplexity would be NaN, which JSON cannot carry
                raise RequestError(f"texts.{i}", 'is empty: it has no token to score (with "eos": true, its EOS is scored)')
        return await wait(submit("score", body), request)

    @app.post("/v1/embed")
    async def embed(body: EmbedBody, request: Request):
        """One vector per text, pooled from its final hidden states: decoders mean, max or
        last token; encoders cls, mean or max; encoder-decoders (their encoder) mean or max."""
        if model.classifies:
            raise RequestError("model", "a classifier classifies texts (/v1/classify); embed with the model it was "
                               "fine-tuned from")
        if model.cfg.model.family not in POOLINGS:
            raise RequestError("model", "embeddings come from a decoder, an encoder or an encoder-decoder's encoder")
        pools = POOLINGS[model.cfg.model.family]
        if body.pooling not in pools:
            raise RequestError("pooling", f"this {model.cfg.model.family} pools {', '.join(pools)}")
        _check_texts(body.texts, limits, "embed")
        return await wait(submit("embed", body), request)

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, request: Request):
        """A fine-tuned classifier's label and per-label probabilities for each text."""
        if not model.classifies:
            raise RequestError("model", "this model is not a fine-tuned classifier (t2x finetune makes one)")
        _check_texts(body.texts, limits, "classify")
        return await wait(submit("classify", body), request)

    return _BodyLimit(app, limits.max_body_bytes) if limits.max_body_bytes else app


class _Busy(Exception):
    pass


def _check_texts(texts: list[str], limits: Limits, verb: str | None = None) -> None:
    """Refuse too many texts, lone surrogates, and (with ``verb``) empty texts."""
    if len(texts) > limits.max_texts:
        raise RequestError("texts", f"at most {limits.max_texts} texts per request, got {len(texts)}")
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON can escape a lone surrogate ("\\ud800"); the tokenizer cannot take it
            raise RequestError(f"texts.{i}", "is not valid Unicode: it holds a lone surrogate") from None
        if verb and not text:
            raise RequestError(f"texts.{i}", f"is empty: it has no token to {verb}")


def serve(model: InferenceModel, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits()) -> None:
    """Compile every shape, then serve until interrupted."""
    import uvicorn

    worker = Worker(model, limits)
    started = time.monotonic()
    worker.warm_up()
    if worker.engine is not None:
        log.info("compiled prefill and decode at lengths %s for up to %d prompts, and score/embed batches of %d, "
                 "in %.1f s", worker.engine.buckets, limits.slots, limits.max_batch, time.monotonic() - started)
    elif worker.seq2seq is not None:
        log.info("compiled decoding of up to %d inputs at each input length in %.1f s", worker.seq2seq.batch_size,
                 time.monotonic() - started)
    else:
        log.info("compiled %s batches of %d in %.1f s", "classify" if model.classifies else "embed",
                 limits.max_batch, time.monotonic() - started)
    uvicorn.run(build_app(model, limits, worker), host=host, port=port, log_level="info")
