"""The HTTP server over real HTTP on 127.0.0.1: each endpoint equals the in-process
function, concurrent requests are batched and answered exactly, bad input gets a 4xx
naming the field and the server keeps serving."""

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import uvicorn

from t2x.infer.engine import generate
from t2x.infer.sampling import Sampling
from t2x.infer.score import Scorer
from t2x.infer.server import Limits, Worker, _Job, build_app
from test_infer import PROMPTS, random_model

LIMITS = Limits(slots=4, max_batch=8, max_texts=8, max_new_tokens=24, max_body_bytes=4096)


@contextlib.contextmanager
def serving(model, limits=LIMITS):
    """``model``'s app served over HTTP on a free port of 127.0.0.1; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(build_app(model, limits), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not running.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        running.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server():
    model = random_model("gpt2")
    with serving(model) as url:
        yield model, url


def call(url, path, body=None, raw=None, content_type="application/json", timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_each_endpoint_equals_the_in_process_function(server):
    model, url = server
    assert call(url, "/healthz") == (200, '{"status":"ok"}')
    status, described = call(url, "/v1/model")
    assert status == 200 and json.loads(described)["context"] == model.context
    settings = Sampling(max_new_tokens=6, temperature=0.9, top_k=50, seed=7)
    status, body = call(url, "/v1/generate", {"prompt": PROMPTS[1], "max_new_tokens": 6, "temperature": 0.9,
                                              "top_k": 50, "seed": 7})
    expected = generate(model, [PROMPTS[1]], settings)[0]
    assert status == 200 and json.loads(body)["tokens"] == expected.tokens and json.loads(body)["text"] == expected.text
    status, body = call(url, "/v1/score", {"texts": PROMPTS, "eos": True})
    scores = Scorer(model).score(PROMPTS, eos=True)
    assert status == 200
    np.testing.assert_allclose([s["log_likelihood"] for s in json.loads(body)["scores"]],
                               [s.log_likelihood for s in scores], rtol=1e-5)
    status, body = call(url, "/v1/embed", {"texts": PROMPTS[:2], "pooling": "last", "normalize": True})
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["embeddings"], Scorer(model).embed(PROMPTS[:2], "last", True),
                               rtol=1e-4, atol=1e-6)


def test_a_streamed_generation_sends_the_text_piece_by_piece(server):
    model, url = server
    status, body = call(url, "/v1/generate", {"prompt": "Return the", "max_new_tokens": 8, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in body.split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1]["done"]
    assert "".join(e["text"] for e in events[:-1]) == events[-1]["text"]
    assert events[-1]["tokens"] == generate(model, ["Return the"], Sampling(max_new_tokens=8))[0].tokens


def test_a_hundred_concurrent_requests_are_each_answered_as_if_alone(server):
    model, url = server
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i % 3) for i in range(100)]
    lengths = [2 + i % 9 for i in range(100)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda a: call(url, "/v1/generate", {"prompt": a[0], "max_new_tokens": a[1]}),
                                zip(prompts, lengths)))
    assert all(status == 200 for status, _ in answers)
    # One slot: each request decoded alone, one after the other.
    alone = generate(model, prompts, [Sampling(max_new_tokens=n) for n in lengths], slots=1)
    for (_, body), expected in zip(answers, alone):
        assert json.loads(body)["tokens"] == expected.tokens


@pytest.mark.parametrize("body,raw,content_type,status,field", [
    (None, b"{not json", "application/json", 400, "body"),
    ({"prompt": "a", "max_new_tokens": "5"}, None, "application/json", 422, "max_new_tokens"),
    ({"prompt": ""}, None, "application/json", 422, "prompt"),
    ({}, None, "application/json", 422, "prompt"),
    ({"prompt": "a", "max_new_tokens": 0}, None, "application/json", 422, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 10**9}, None, "application/json", 422, "max_new_tokens"),
    ({"prompt": "a", "temperature": -1.0}, None, "application/json", 422, "temperature"),
    ({"prompt": "a", "top_k": 2**40}, None, "application/json", 422, "top_k"),  # past int32: it once killed the worker
    ({"prompt": "word " * 200}, None, "application/json", 422, "prompt"),
    ({"prompt": "a", "colour": "red"}, None, "application/json", 422, "colour"),
    ({"prompt": "a"}, None, "text/plain", 415, "content-type"),
    (None, b'{"prompt": "' + b"a" * 5000 + b'"}', "application/json", 413, "body"),
    (None, b"[" * 3000 + b"]" * 3000, "application/json", 413, "body"),
    (None, b'{"prompt": "\xff\xfe"}', "application/json", 400, "body"),
])
def test_bad_generate_requests_get_a_4xx_naming_the_field(server, body, raw, content_type, status, field):
    _, url = server
    got, answer = call(url, "/v1/generate", body, raw, content_type)
    assert got == status and json.loads(answer)["error"]["field"] == field, answer
    assert call(url, "/v1/generate", {"prompt": "a", "max_new_tokens": 2})[0] == 200  # still serving


def test_bad_score_and_embed_requests_get_a_4xx_naming_the_field(server):
    _, url = server
    for path, body, field in [
        ("/v1/score", {"texts": []}, "texts"),
        ("/v1/score", {"texts": ["a"] * 9}, "texts"),
        ("/v1/score", {"texts": [1, 2]}, "texts.0"),
        ("/v1/embed", {"texts": ["a", ""]}, "texts.1"),
        ("/v1/embed", {"texts": ["a"], "pooling": "cls"}, "pooling"),
        ("/v1/score", {"texts": ["a", "\ud800"]}, "texts.1"),  # a lone surrogate, escaped in JSON
        ("/v1/embed", {"texts": ["\udfff"]}, "texts.0"),
        ("/v1/score", {"texts": ["a", ""]}, "texts.1"),  # no token, so no perplexity
    ]:
        status, answer = call(url, path, body)
        assert status == 422 and json.loads(answer)["error"]["field"] == field, (path, body, answer)


def test_the_worker_outlives_a_request_it_cannot_run(server):
    model, _ = server
    worker = Worker(model, LIMITS)
    worker.start()

    async def run():
        loop = asyncio.get_running_loop()
        bad = worker.engine.encode("a", Sampling(max_new_tokens=2, top_k=2**40))  # prefill cannot hold it in an int32
        good = worker.engine.encode("a", Sampling(max_new_tokens=2))
        jobs = [_Job("generate", r, loop, loop.create_future()) for r in (bad, good)]
        for job in jobs:
            worker.jobs.put_nowait(job)
        return await asyncio.gather(*(asyncio.wait_for(j.done, 60) for j in jobs), return_exceptions=True)

    failed, answered = asyncio.run(run())
    worker.stop()
    assert isinstance(failed, OverflowError)
    assert answered["tokens"] == generate(model, ["a"], Sampling(max_new_tokens=2))[0].tokens


def test_the_servers_warm_up_compiles_every_decoding_program(server):
    model, _ = server
    worker = Worker(model, LIMITS)
    worker.warm_up()
    engine = worker.engine
    compiled = (engine._prefill._cache_size(), engine._decode._cache_size())  # programs jax has traced
    prompts = [p * r for p, r in zip(PROMPTS * 2, [1, 2, 5, 1, 4, 1, 1, 1])]
    generate(model, prompts, [Sampling(max_new_tokens=n, temperature=n % 2) for n in range(3, 11)], slots=LIMITS.slots)
    assert (engine._prefill._cache_size(), engine._decode._cache_size()) == compiled
