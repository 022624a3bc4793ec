"""The HTTP server under load and attack: a real ``t2x serve`` process on 127.0.0.1
serving the quickstart model, driven by many clients and hostile ones.

    python reliability/serve.py                      # about 15 minutes on 2 CPU cores
    python reliability/serve.py --export exports/tiny --requests 1000 --no-write

- **load**: ``--requests`` generate (some streamed), score and embed requests from
  ``--clients`` clients; every answer must be a 200, and a random sample is compared with
  t2x's Python API on the same export (``generate``, ``Scorer``).
- **throughput**: fixed-size generate requests from 1, 8 and 32 clients.
- **attack**: oversized, nested, mistyped, out-of-range and non-UTF-8 bodies, slow clients
  holding connections open, clients that leave mid-stream; after each kind a normal
  request must still succeed. The server's RSS is sampled throughout.
- **loading**: the server runs under an audit hook that logs any unpickling and every file
  it opens in the export directory.

The results replace the section between the ``serve.py`` markers of docs/reliability.md
(``reliability/run.py`` keeps that section when it rewrites the page); the throughput
table is printed for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import http.client
import json
import os
import pathlib
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from harness import CONFIG, REPO, env, free_port, t2x  # noqa: E402

BEGIN, END = "<!-- serve.py: begin -->", "<!-- serve.py: end -->"

# ``t2x serve`` under an audit hook: every unpickled class, and every file opened or code
# compiled from the export directory, is written to standard error as an AUDIT line.
AUDITED = """
import os, sys
export = os.path.realpath(sys.argv[2]) + os.sep
def audit(event, args):
    if event == "pickle.find_class":
        sys.stderr.write(f"AUDIT pickle.find_class {args[0]}.{args[1]}\\n")
    elif event in ("open", "compile") and isinstance(args[1 if event == "compile" else 0], (str, bytes)):
        path = os.fsdecode(args[1 if event == "compile" else 0])
        if os.path.realpath(path).startswith(export):
            sys.stderr.write(f"AUDIT {event} {os.path.basename(path)}\\n")
sys.addaudithook(audit)
from t2x.cli import main
sys.exit(main(sys.argv[1:]))
"""

# What loading an export runs through, and what would unpickle or execute a file.
LOADING_CODE = ["t2x/export.py", "t2x/infer/model.py", "t2x/config.py", "t2x/data/tokenizer.py"]
UNSAFE = re.compile(r"\bpickle\b|allow_pickle|torch\.load|yaml\.(unsafe_|full_)?load\(|\beval\(|\bexec\(|marshal")


# The model and the server.


def export_model(work: pathlib.Path, steps: int) -> str:
    """Train the quickstart model (``configs/tiny.yaml``) for ``steps`` and export it;
    reuses ``work``'s export if there is one."""
    run_dir, export = work / "run", work / "export"
    if (export / "manifest.json").exists():
        return str(export)
    for cmd in (t2x("train", CONFIG, f"train.run_dir={run_dir}", f"train.steps={steps}", "train.progress_bar=false"),
                t2x("export", str(run_dir), "--output", str(export))):
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, env=env(devices=1), cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return str(export)


class Server:
    """``t2x serve EXPORT`` on a free loopback port, under the audit hook, its RSS sampled."""

    def __init__(self, export: str, log_path: pathlib.Path):
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-c", AUDITED, "serve", export, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env(devices=1), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.rss: list[tuple[str, int]] = []  # (phase, kB)
        self.phase = "start"
        deadline = time.time() + 900
        while not self._healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start; see {log_path}")
            time.sleep(0.5)
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _healthy(self) -> bool:
        try:
            return request(self.port, "GET", "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def _sample_rss(self) -> None:
        while self.proc.poll() is None:
            try:
                status = pathlib.Path(f"/proc/{self.proc.pid}/status").read_text()
            except OSError:
                return
            found = re.search(r"VmRSS:\s+(\d+)", status)
            if found is None:  # the process is exiting
                return
            self.rss.append((self.phase, int(found.group(1))))
            time.sleep(0.2)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return self.log_path.read_text(errors="replace")


# Clients.


def request(port: int, method: str, path: str, body=None, timeout: float = 120,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, str, float]:
    """(status, answer, seconds) of one request; ``connection`` is kept alive if given."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body) if body is not None else None
    started = time.perf_counter()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, text, time.perf_counter() - started
    finally:
        if connection is None:
            conn.close()


class Client:
    """One keep-alive connection. A request whose reused connection the server had
    already closed (before answering anything) is sent again once, as HTTP clients do."""

    def __init__(self, port: int):
        self.port, self.conn, self.resent = port, None, 0

    def post(self, path: str, body: dict) -> tuple[int, str, float]:
        for attempt in (0, 1):
            fresh = self.conn is None
            if fresh:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                return request(self.port, "POST", path, body, connection=self.conn)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                self.conn = None
                if fresh or attempt:
                    raise
                self.resent += 1
        raise AssertionError("unreachable")


def normal_request_ok(port: int) -> bool:
    try:
        return request(port, "POST", "/v1/generate", {"prompt": "Return the", "max_new_tokens": 4}, timeout=60)[0] == 200
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


# Load.


def corpus_words() -> list[str]:
    """Words of the builtins' docstrings: English and code, like the training text."""
    import builtins

    return " ".join(v.__doc__ for v in vars(builtins).values() if isinstance(v.__doc__, str)).split()


def load_plan(count: int, seed: int = 0) -> list[tuple[str, dict]]:
    """(path, body) of ``count`` requests: half generate (a quarter of those streamed, a
    tenth sampled), a quarter score, a quarter embed; prompts and texts of 1 to 150 words."""
    rng, words = random.Random(seed), corpus_words()

    def text(most: int) -> str:
        n = rng.randint(1, most)
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    plan = []
    for _ in range(count):
        kind = rng.choices(["generate", "score", "embed"], [2, 1, 1])[0]
        if kind == "generate":
            body = {"prompt": text(30), "max_new_tokens": rng.randint(1, 16), "stream": rng.random() < 0.25}
            if rng.random() < 0.1:
                body.update(temperature=0.8, top_k=40, seed=rng.randrange(2**32))
        elif kind == "score":
            body = {"texts": [text(150) for _ in range(rng.randint(1, 4))], "eos": rng.random() < 0.5}
        else:
            body = {"texts": [text(60) for _ in range(rng.randint(1, 4))], "pooling": rng.choice(["mean", "last"]),
                    "normalize": rng.random() < 0.5}
        plan.append((f"/v1/{kind}", body))
    return plan


def streamed(answer: str) -> dict:
    """The final result of a server-sent event stream, checked: its text pieces add up to
    its text."""
    events = [json.loads(line[len("data: "):]) for line in answer.split("\n\n") if line.startswith("data: ")]
    final = events[-1]
    if not final.get("done") or "".join(e["text"] for e in events[:-1]) != final["text"]:
        raise ValueError("the streamed pieces do not add up to the final text")
    return final


@dataclasses.dataclass
class LoadResult:
    statuses: collections.Counter
    seconds: dict  # kind -> latencies
    wall: float
    resent: int
    failures: list  # (index, what)
    sample: dict  # index -> answer text


def run_load(port: int, plan: list[tuple[str, dict]], clients: int, sample: set[int]) -> LoadResult:
    statuses, failures = collections.Counter(), []
    seconds, answers = collections.defaultdict(list), {}
    todo = iter(range(len(plan)))
    lock = threading.Lock()
    resent = 0

    def work():
        nonlocal resent
        client = Client(port)
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                break
            path, body = plan[i]
            kind = path.rsplit("/", 1)[-1] + (" (streamed)" if body.get("stream") else "")
            try:
                status, answer, took = client.post(path, body)
            except OSError as e:
                with lock:
                    statuses["no answer"] += 1
                    failures.append((i, repr(e)))
                continue
            with lock:
                statuses[status] += 1
                seconds[kind].append(took)
                if status != 200:
                    failures.append((i, f"{status} {answer[:200]}"))
                elif i in sample:
                    answers[i] = answer
        with lock:
            resent += client.resent

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(work) for _ in range(clients)]:
            f.result()
    return LoadResult(statuses, dict(seconds), time.perf_counter() - started, resent, failures, answers)


def check_sample(export: str, plan: list[tuple[str, dict]], answers: dict) -> tuple[int, list[str]]:
    """Compare each sampled answer with t2x's Python API; returns (checked, mismatches)."""
    import numpy as np

    from t2x.infer.engine import generate
    from t2x.infer.model import load
    from t2x.infer.sampling import Sampling
    from t2x.infer.score import Scorer

    model = load(export)
    scorer = Scorer(model, batch_size=16)
    wrong = []
    gen = [i for i in answers if plan[i][0] == "/v1/generate"]
    settings = [Sampling(plan[i][1]["max_new_tokens"], plan[i][1].get("temperature", 0.0), plan[i][1].get("top_k", 0),
                         1.0, plan[i][1].get("seed", 0)) for i in gen]
    expected = generate(model, [plan[i][1]["prompt"] for i in gen], settings) if gen else []
    for i, want in zip(gen, expected):
        try:
            got = streamed(answers[i]) if plan[i][1]["stream"] else json.loads(answers[i])
        except ValueError as e:
            wrong.append(f"request {i}: {e}")
            continue
        if (got["tokens"], got["text"], got["finish_reason"]) != (want.tokens, want.text, want.finish_reason):
            wrong.append(f"request {i}: tokens {got['tokens']} != {want.tokens}")
    for i, answer in answers.items():
        path, body = plan[i]
        if path == "/v1/generate":
            continue
        got = json.loads(answer)
        if path == "/v1/score":
            want = scorer.score(body["texts"], eos=body["eos"])
            ll = [s["log_likelihood"] for s in got["scores"]]
            if [s["tokens"] for s in got["scores"]] != [s.tokens for s in want] or not np.allclose(
                    ll, [s.log_likelihood for s in want], rtol=1e-4, atol=1e-4):
                wrong.append(f"request {i}: scores {ll} != {[s.log_likelihood for s in want]}")
        elif path == "/v1/embed":
            want = scorer.embed(body["texts"], body["pooling"], body["normalize"])
            if not np.allclose(got["embeddings"], want, rtol=1e-4, atol=1e-4):
                wrong.append(f"request {i}: embeddings differ by up to {np.abs(np.array(got['embeddings']) - want).max()}")
    return len(answers), wrong


# Throughput.


def throughput(port: int, clients: int, requests: int, new_tokens: int = 32) -> dict:
    """Fixed-size greedy generate requests (a 16-word prompt whose continuation runs
    ``new_tokens`` tokens without an EOS) from ``clients`` clients: requests/s, new
    tokens/s, p50 and p99 latency."""
    words = corpus_words()
    for start in range(0, len(words), 16):
        body = {"prompt": " ".join(words[start : start + 16]), "max_new_tokens": new_tokens}
        if len(json.loads(request(port, "POST", "/v1/generate", body)[1])["tokens"]) == new_tokens:
            break
    latencies, tokens, lock = [], [0], threading.Lock()
    todo = iter(range(requests))

    def work():
        client = Client(port)
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            status, answer, took = client.post("/v1/generate", body)
            assert status == 200, answer
            with lock:
                latencies.append(took)
                tokens[0] += len(json.loads(answer)["tokens"])

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:  # warm-up: connections made, caches touched
        list(pool.map(lambda _: Client(port).post("/v1/generate", body), range(clients)))
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(work) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": requests, "rps": requests / wall, "tps": tokens[0] / wall,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


# Attacks. Each sends raw bytes, so nothing is tidied up on the way.


def raw_exchange(port: int, head: bytes, body_chunks=(), timeout: float = 30) -> str:
    """Send ``head`` then each chunk of ``body_chunks``; the status code the server
    answered, or "closed" if it closed the connection without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head)
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all
        data = b""
        try:
            while b"\r\n" not in data:
                more = s.recv(4096)
                if not more:
                    break
                data += more
        except ConnectionResetError:
            pass
        except TimeoutError:
            return "no answer"
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return match.group(1).decode() if match else "closed"


def post_head(path: str, headers: dict) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


def post_raw(port: int, path: str, body: bytes, content_type: str | None = "application/json") -> str:
    headers = {"Content-Length": len(body), "Connection": "close"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return raw_exchange(port, post_head(path, headers), [body])


@dataclasses.dataclass
class Attack:
    name: str
    answers: list  # status codes, "closed" or "no answer"
    served_after: bool
    detail: str = ""

    @property
    def refused(self) -> int:
        return sum(1 for a in self.answers if a == "closed" or str(a).startswith("4"))


def attacks_of_bodies(port: int, limit: int) -> list[Attack]:
    """Oversized, nested, mistyped, out-of-range and non-UTF-8 bodies."""
    huge = b'{"prompt": "' + b"a" * (2 * limit) + b'"}'
    cases = {
        f"body of {len(huge) >> 20} MiB with Content-Length": lambda: [post_raw(port, "/v1/generate", huge)],
        f"body of {len(huge) >> 20} MiB chunked, no Content-Length": lambda: [raw_exchange(
            port, post_head("/v1/generate", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}),
            [b"%x\r\n%s\r\n" % (65536, huge[i : i + 65536]) for i in range(0, len(huge) - 65536, 65536)] + [b"0\r\n\r\n"])],
        "Content-Length of 10^15, or not a number, nothing sent": lambda: [
            raw_exchange(port, post_head("/v1/generate", {"Content-Type": "application/json", "Content-Length": 10**15})),
            raw_exchange(port, post_head("/v1/generate", {"Content-Type": "application/json", "Content-Length": "12a"}))],
        "JSON nested 400,000 deep (arrays, objects), under the body limit": lambda: [
            post_raw(port, "/v1/generate", b"[" * 400_000 + b"]" * 400_000),
            post_raw(port, "/v1/score", b'{"texts": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}")],
        "wrong content types (text/plain, form, multipart, XML, none)": lambda: [
            post_raw(port, "/v1/generate", b'{"prompt": "a"}', t) for t in
            ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", None)],
        "max_new_tokens -1, 0, -2^63, 10^6, 10^100, 1e9, \"5\"": lambda: [
            post_raw(port, "/v1/generate", b'{"prompt": "a", "max_new_tokens": %s}' % v)
            for v in (b"-1", b"0", b"-9223372036854775808", b"1000000", b"1" + b"0" * 100, b"1e9", b'"5"')],
        "other settings out of range (top_k 2^40, seed -1 and 2^64, temperature NaN and -Infinity, top_p 0)": lambda: [
            post_raw(port, "/v1/generate", b'{"prompt": "a", %s}' % v) for v in
            (b'"top_k": 1099511627776', b'"seed": -1', b'"seed": 18446744073709551616', b'"temperature": NaN',
             b'"temperature": -Infinity', b'"top_p": 0')],
        "non-UTF-8 bytes, lone surrogates, NUL": lambda: [
            post_raw(port, "/v1/generate", b'{"prompt": "\xff\xfe\x80"}'),
            post_raw(port, "/v1/score", b'{"texts": ["caf\xe9"]}'),
            post_raw(port, "/v1/embed", bytes(random.Random(0).randrange(256) for _ in range(4096))),
            post_raw(port, "/v1/generate", b'{"prompt": "\\ud800"}'),
            post_raw(port, "/v1/score", b'{"texts": ["a\\udfff"]}'),
            post_raw(port, "/v1/embed", b'{"texts": ["\\udc00"]}'),
            post_raw(port, "/v1/score", b'{"texts": ["a\\u0000b", ""]}')],
    }
    out = []
    for name, send in cases.items():
        answers = send()
        out.append(Attack(name, answers, normal_request_ok(port), ", ".join(map(str, answers))))
        print(f"  {name}: {out[-1].detail}", flush=True)
    return out


def slowloris(port: int, sockets: int, seconds: float) -> list[Attack]:
    """``sockets`` connections sending a request's headers a byte at a time (each socket a
    byte every ~0.5 s) while one client sends normal requests; then the same sockets left
    silent. Returns the slow clients' row."""
    head = post_head("/v1/generate", {"Content-Type": "application/json", "Content-Length": 40}) + b'{"prompt": "a"'
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(sockets)]
    sent, closed = [0] * sockets, set()
    served, stop = [], threading.Event()

    def normal():
        client = Client(port)
        while not stop.is_set():
            try:
                served.append(client.post("/v1/generate", {"prompt": "Return the", "max_new_tokens": 8})[::2])
            except OSError as e:
                served.append((repr(e), 0.0))

    thread = threading.Thread(target=normal)
    thread.start()
    deadline = time.time() + seconds
    while time.time() < deadline:
        for i, s in enumerate(held):
            if i in closed or sent[i] >= len(head):
                continue
            try:
                s.sendall(head[sent[i] : sent[i] + 1])
                sent[i] += 1
            except OSError:
                closed.add(i)
        time.sleep(0.5)
    stop.set()
    thread.join()
    for s in held:  # did the server close any?
        s.setblocking(False)
    time.sleep(1)
    answered = 0
    for i, s in enumerate(held):
        try:
            data = s.recv(4096)
            if data:
                answered += 1
            else:
                closed.add(i)
        except BlockingIOError:
            pass
        except OSError:
            closed.add(i)
        s.close()
    ok = [t for status, t in served if status == 200]
    detail = (f"{sockets} sockets, {min(sent)}-{max(sent)} bytes each over {seconds:.0f} s; closed by the server: "
              f"{len(closed)}, answered: {answered}, still open: {sockets - len(closed) - answered}; meanwhile "
              f"{len(ok)}/{len(served)} normal requests answered 200 (p50 {ms(percentile(ok, 50))}, "
              f"p99 {ms(percentile(ok, 99))})")
    return [Attack("slow clients: headers a byte at a time (slowloris)", ["closed"] * len(closed),
                   normal_request_ok(port) and len(ok) == len(served) > 0, detail)]


def leave_mid_stream(port: int, slots: int, rounds: int) -> list[Attack]:
    """Clients that start a long streamed generation, read its first piece and close the
    connection. Freed slots show as ``slots`` short requests answered at once afterwards,
    not after the abandoned generations would have run to their end."""
    long = {"prompt": "Return the", "max_new_tokens": 512, "stream": True}  # to the context's end
    body = json.dumps(long).encode()
    head = post_head("/v1/generate", {"Content-Type": "application/json", "Content-Length": len(body)})

    def concurrent_generates(payload: dict) -> float:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(slots) as pool:
            answers = list(pool.map(lambda _: request(port, "POST", "/v1/generate", payload)[0], range(slots)))
        assert answers == [200] * slots, answers
        return time.perf_counter() - started

    full = concurrent_generates(long)  # what a leaked slot would hold up
    left = 0
    for _ in range(rounds):  # back to back: leaked slots would add up to rounds * full
        conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(slots)]
        for c in conns:
            c.sendall(head + body)
        for c in conns:
            seen = b""
            while b"data: " not in seen and (more := c.recv(4096)):
                seen += more
            left += b"data: " in seen
            c.close()
    waits = [concurrent_generates({"prompt": "Open", "max_new_tokens": 1})]
    # And clients that leave before a non-streamed answer.
    body2 = json.dumps({"prompt": "Read", "max_new_tokens": 512}).encode()
    for _ in range(slots):
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(post_head("/v1/generate", {"Content-Type": "application/json", "Content-Length": len(body2)}) + body2)
    waits.append(concurrent_generates({"prompt": "Open", "max_new_tokens": 1}))
    detail = (f"{left} streams of up to 512 tokens left after their first piece ({rounds} rounds of {slots}, back to "
              f"back), then {slots} one-token requests answered in {ms(waits[0])}; {slots} non-streamed left "
              f"unanswered, then {slots} one-token requests answered in {ms(waits[1])}. Were the abandoned slots still "
              f"decoding, that would take about {rounds} x {ms(full)} ({slots} generations to the end)")
    return [Attack("clients leaving mid-stream", ["closed"] * (left + slots),
                   normal_request_ok(port) and max(waits) < full, detail)]


# The report.


def audit_findings(log: str) -> tuple[str, str]:
    """What the audit hook saw, and what a search of the loading code found."""
    unpickled = sorted(set(re.findall(r"AUDIT pickle.find_class (\S+)", log)))
    opened = sorted(set(re.findall(r"AUDIT open (\S+)", log)))
    compiled = sorted(set(re.findall(r"AUDIT compile (\S+)", log)))
    hits = [f"{p}:{n}" for p in LOADING_CODE
            for n, line in enumerate((REPO / p).read_text().splitlines(), 1) if UNSAFE.search(line.split("#")[0])]
    seen = (f"classes unpickled: {', '.join(unpickled) or 'none'}; files of the export opened: "
            f"{', '.join(opened) or 'none'}; code compiled from it: {', '.join(compiled) or 'none'}")
    searched = f"{', '.join(f'`{p}`' for p in LOADING_CODE)}: {', '.join(hits) or 'no'} `pickle`, `allow_pickle`, `torch.load`, `yaml.load`, `eval`, `exec` or `marshal`"
    return seen, searched


def section(args, command: str, load: LoadResult, checked: int, wrong: list, bench: list, after: dict, attacks: list,
            rss: list, audit: tuple[str, str], tracebacks: int, minutes: float) -> str:
    total = sum(load.statuses.values())
    rows = []
    for kind in sorted(load.seconds):
        t = load.seconds[kind]
        rows.append(f"| {kind} | {len(t):,} | {ms(percentile(t, 50))} | {ms(percentile(t, 99))} |")
    peak = {p: max(k for q, k in rss if q == p) for p in dict.fromkeys(q for q, _ in rss) if p not in ("start", "end")}
    lines = [
        BEGIN,
        "## Serving under load and attack",
        "",
        "A real `t2x serve` process on 127.0.0.1 (default limits: 8 slots, 1 MiB bodies), serving the",
        "quickstart model, under many clients and hostile ones; regenerate this section with",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Last run: {datetime.date.today().isoformat()}, {platform.platform()}, {os.cpu_count()} CPU cores "
        f"(server and clients on the same cores); {minutes:.0f} minutes.",
        "",
        f"**Load**: {total:,} requests from {args.clients} clients (half generate, a quarter of those streamed and a",
        "tenth sampled, 1 to 16 new tokens; a quarter score; a quarter embed; 1 to 4 texts of 1 to 150 words) in",
        f"{load.wall:.0f} s, {total / load.wall:.1f} requests/s. Answers: "
        + ", ".join(f"{n:,} {s}" for s, n in sorted(load.statuses.items(), key=str))
        + f"; {load.resent} resent on a fresh connection after the server closed an idle one.",
        f"Checked against t2x's Python API on the same export: {checked} sampled answers, {len(wrong)} wrong",
        "(generate: tokens, text and finish reason equal; score and embed within 1e-4).",
        "",
        "| kind | requests | p50 latency | p99 latency |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        f"One client's fixed-size generate (16-word prompt, 32 new tokens): p50 {ms(bench[0]['p50'])} before the load,",
        f"{ms(after['p50'])} after it.",
        "",
        "**Attack**: each kind of hostile request, then a normal generate request.",
        "",
        "| attack | sent | 4xx or closed | a normal request after | answers |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {a.name} | {len(a.answers) if a.answers else '-'} | {a.refused} | {'served' if a.served_after else 'FAILED'} "
          f"| {a.detail} |" for a in attacks],
        "",
        "Slow clients are not cut off: uvicorn has no timeout for a request's headers, so each holds a socket (and a",
        "file descriptor) for as long as it keeps sending; the other clients are served meanwhile. In front of an",
        "untrusted network, put the server behind a proxy that enforces header timeouts.",
        "",
        f"**Memory** (the server's RSS, sampled every 0.2 s): {rss[0][1] / 1024:.0f} MiB after compiling, peak "
        + ", ".join(f"{k / 1024:.0f} MiB during {p}" for p, k in peak.items())
        + f", {rss[-1][1] / 1024:.0f} MiB at the end.",
        "",
        f"**Server errors**: {tracebacks} tracebacks in the server's log.",
        "",
        f"**Loading an export runs nothing from it.** The server ran under an audit hook (`sys.addaudithook`): {audit[0]}.",
        f"A search of the loading code, {audit[1]}.",
        "",
        "Throughput at 1, 8 and 32 clients is in [benchmarks](benchmarks.md#serving).",
        END,
    ]
    return "\n".join(lines)


def bench_table(bench: list[dict], command: str) -> str:
    lines = ["| clients | requests | requests/s | new tokens/s | p50 latency | p99 latency |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {b['clients']} | {b['requests']} | {b['rps']:.1f} | {b['tps']:,.0f} | {ms(b['p50'])} | {ms(b['p99'])} |"
              for b in bench]
    return f"`{command}`\n\n" + "\n".join(lines)


def write_section(text: str) -> None:
    page = REPO / "docs" / "reliability.md"
    old = page.read_text()
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    page.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="serve this export (default: train and export the quickstart model)")
    parser.add_argument("--steps", type=int, default=600, help="training steps of that model")
    parser.add_argument("--requests", type=int, default=10_000, help="requests of the load")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients of the load")
    parser.add_argument("--check", type=int, default=300, help="answers of the load compared with the Python API")
    parser.add_argument("--bench-requests", type=int, default=200, help="requests per level of the throughput runs")
    parser.add_argument("--slow-sockets", type=int, default=1000, help="slow clients holding connections")
    parser.add_argument("--slow-seconds", type=float, default=30, help="how long they hold them")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing docs/reliability.md")
    args = parser.parse_args(argv)

    started = time.time()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="t2x-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    export = args.export or export_model(work, args.steps)
    server = Server(export, work / "server.log")
    port = server.port
    try:
        limits = json.loads(request(port, "GET", "/v1/model")[1])["limits"]
        print(f"serving {export} on port {port}, limits {limits}", flush=True)

        server.phase = "throughput runs"
        bench = [throughput(port, c, max(args.bench_requests, 2 * c)) for c in (1, 8, 32)]
        for b in bench:
            print(f"throughput: {b}", flush=True)

        server.phase = "load"
        plan = load_plan(args.requests)
        sample = set(random.Random(1).sample(range(len(plan)), min(args.check, len(plan))))
        load = run_load(port, plan, args.clients, sample)
        print(f"load: {dict(load.statuses)} in {load.wall:.0f} s; {load.failures[:5]}", flush=True)
        after = throughput(port, 1, max(args.bench_requests // 4, 2))
        print(f"one client after the load: {after}", flush=True)

        server.phase = "attack"
        attacks = attacks_of_bodies(port, limits["max_body_bytes"])
        attacks += slowloris(port, args.slow_sockets, args.slow_seconds)
        print(f"  {attacks[-1].name}: {attacks[-1].detail}", flush=True)
        attacks += leave_mid_stream(port, limits["slots"], rounds=10)
        print(f"  {attacks[-1].name}: {attacks[-1].detail}", flush=True)
        server.phase = "end"
        time.sleep(1)
    finally:
        log = server.stop()
    checked, wrong = check_sample(export, plan, load.sample)
    print(f"checked {checked} answers: {len(wrong)} wrong {wrong[:5]}", flush=True)

    command = " ".join(["python reliability/serve.py", *(sys.argv[1:] if argv is None else argv)]).strip()
    tracebacks = log.count("Traceback")
    text = section(args, command, load, checked, wrong, bench, after, attacks, server.rss, audit_findings(log), tracebacks,
                   (time.time() - started) / 60)
    print(bench_table(bench, command))
    if args.no_write:
        print(text)
    else:
        write_section(text)
        print(f"wrote its section of {REPO / 'docs' / 'reliability.md'}")
    lost = sum(n for s, n in load.statuses.items() if s != 200)
    failed = lost or wrong or tracebacks or not all(a.served_after and a.refused == len(a.answers) for a in attacks)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
