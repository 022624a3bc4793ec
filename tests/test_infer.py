"""Export and inference: export directories, generation with a KV cache, sampling,
scoring and embeddings, on one device and sharded, through the library and the CLI."""

import functools
import json
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import REPO, restored, tiny_config
from t2x.cli import main
from t2x.data.tokenizer import load_tokenizer
from t2x.export import Exported, ExportError, export_run, flatten, read_export
from t2x.infer.engine import Engine, RequestError, generate
from t2x.infer.model import load, mesh_overrides, place
from t2x.infer.sampling import Sampling, sample
from t2x.infer.score import Scorer
from t2x.models import build_model
from t2x.train.loop import train

MIXED = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]  # FSDP x tensor x data on 8 devices
VARIANTS = {
    "gpt2": [],
    "llama_unscanned": ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.use_bias=false",
                        "model.num_kv_heads=2", "model.tie_embeddings=false", "model.scan_layers=false"],
}
PROMPTS = ["def", "Return the number of", "A", "The module provides functions for reading and writing"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained on 8 devices with an FSDP x tensor x data mesh."""
    path = tmp_path_factory.mktemp("run")
    train(tiny_config(path, *MIXED))
    return path


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "float32"
    export_run(str(run), str(out))
    return out


def forward(model, tokens, hidden=False):
    """The logits (or hidden states) at each of ``tokens`` (one row), in one compiled
    program per model: the row is padded on the right to the context, which a causal
    model's earlier positions never see."""
    padded = np.zeros((1, model.context), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(_apply(model.cfg.model, hidden)(model.params, padded))[0, : len(tokens)]


@functools.cache
def _apply(cfg, hidden):
    module = build_model(cfg)
    return jax.jit(lambda params, tokens: module.apply({"params": params}, tokens, hidden=hidden))


def random_model(variant: str, overrides=(), settings=None):
    """A randomly initialized tiny model (larger init, so that logits are far from ties)
    of ``VARIANTS[variant]``, or of ``settings`` when given."""
    cfg = tiny_config("/nonexistent", "model.init_std=0.3", *(VARIANTS[variant] if settings is None else settings))
    module = build_model(cfg.model)
    params = nn.unbox(module.init(jax.random.key(1), np.zeros((1, 8), np.int32))["params"])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    exported = Exported(cfg, jax.device_get(params), tokenizer.files, {"kind": "test", "path": variant})
    return place(exported, mesh_overrides(overrides))


def test_export_holds_the_trained_parameters_bit_for_bit(run, exported, tmp_path):
    manifest = json.loads((exported / "manifest.json").read_text())
    state, _ = restored(run, *MIXED)
    trained = {k: np.asarray(v) for k, v in flatten(jax.device_get(state.params)).items()}
    assert manifest["source"]["step"] == 4 and manifest["dtype"] == "float32"
    assert manifest["parameters"] == sum(v.size for v in trained.values())
    assert set(manifest["files"]) == {"model.safetensors", "config.yaml", "tokenizer.model"}
    got = flatten(read_export(str(exported)).params)
    assert got.keys() == trained.keys()
    for name, value in trained.items():
        assert got[name].dtype == np.float32 and np.array_equal(got[name].view(np.uint32), value.view(np.uint32)), name
    half = tmp_path / "bf16"
    export_run(str(run), str(half), dtype="bfloat16")
    rounded = flatten(read_export(str(half)).params)
    for name, value in trained.items():
        expected = np.asarray(jnp.asarray(value).astype(jnp.bfloat16))
        assert rounded[name].dtype == ml_dtypes.bfloat16 and np.array_equal(rounded[name].view(np.uint16), expected.view(np.uint16))
    assert (half / "model.safetensors").stat().st_size < 0.6 * (exported / "model.safetensors").stat().st_size


def test_a_damaged_or_unusable_export_is_refused_clearly(run, exported, tmp_path):
    with pytest.raises(ExportError, match="not an empty directory"):
        export_run(str(run), str(exported))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in exported.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match the SHA-256"):
        read_export(str(damaged))
    (damaged / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    read_export(str(damaged))
    (damaged / "tokenizer.model").unlink()
    with pytest.raises(ExportError, match="tokenizer.model is missing"):
        read_export(str(damaged))
    with pytest.raises(ExportError, match="neither an export directory nor a run directory"):
        load(str(tmp_path / "nowhere"))


def test_loading_an_export_needs_neither_orbax_nor_tensorflow(exported):
    code = (
        "import sys; from t2x.infer.model import load; from t2x.infer.engine import generate; "
        "from t2x.infer.score import Scorer; "
        f"m = load({str(exported)!r}); print(generate(m, ['The'])[0].text is not None); "
        "print(Scorer(m).score(['the text'])[0].tokens > 0); "
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'orbax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["True", "True", "[]"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_recomputation(variant):
    """Prompts of different lengths decoded together with the cache give the tokens that
    full recomputation (one forward pass over prompt and continuation) predicts."""
    model = random_model(variant)
    completions = generate(model, PROMPTS, Sampling(max_new_tokens=8), slots=4)
    tok = model.tokenizer
    for c in completions:
        assert c.finish_reason in ("length", "eos") and (c.finish_reason != "length" or len(c.tokens) == 8)
        ids = [tok.bos_id, *tok.encode([c.prompt])[0], *c.tokens]
        logits = forward(model, ids[:-1])
        predicted = logits[c.prompt_tokens:].argmax(-1)
        assert list(predicted[: len(c.tokens)]) == c.tokens, c.prompt
        top2 = np.sort(logits[c.prompt_tokens:], axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "a near tie would make this test meaningless"


def test_generation_sharded_over_eight_devices_equals_one_device():
    one = random_model("llama_unscanned")
    eight = random_model("llama_unscanned", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    settings = Sampling(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    a = generate(one, PROMPTS, settings)
    b = generate(eight, PROMPTS, settings)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    sa, sb = Scorer(one).score(PROMPTS), Scorer(eight).score(PROMPTS)
    np.testing.assert_allclose([s.log_likelihood for s in sa], [s.log_likelihood for s in sb], rtol=1e-5)


def test_a_layers_loop_placed_on_several_cpu_devices_is_warned_of(caplog):
    """Generation and serving place their model apart from training's ``build``, and warn
    as it does of a loop of layers over several CPU devices (``warn_of_cpu_loops``)."""
    looped = ["model.scan_layers=true", "model.scan_unroll=1"]
    random_model("gpt2", ["mesh.data=2"], settings=["model.scan_layers=true"])
    random_model("gpt2", settings=looped)
    assert "leaves the layers in a loop" not in caplog.text
    random_model("gpt2", ["mesh.data=2"], settings=looped)
    assert "model.scan_unroll=1 leaves the layers in a loop" in caplog.text


def test_a_request_decodes_the_same_alone_or_in_a_busy_batch():
    model = random_model("gpt2")
    settings = [Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=s) for s in range(len(PROMPTS))]
    together = generate(model, PROMPTS, settings, slots=2)  # slots are reused as requests finish
    alone = [generate(model, [p], s, slots=1)[0] for p, s in zip(PROMPTS, settings)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    reseeded = generate(model, PROMPTS[:1], Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=99))
    assert reseeded[0].tokens != alone[0].tokens
    # A freed slot is greedy again (a sampling row makes every decode step take the slow path).
    engine = Engine(model, 2)
    slot = engine.add(engine.encode(PROMPTS[0], settings[0]))
    assert engine.temperature[slot] == 1.0
    while engine.busy():
        engine.step()
    assert not engine.temperature.any() and not engine.top_k.any() and (engine.top_p == 1).all()


def test_after_warm_up_no_request_compiles_anything():
    model = random_model("gpt2")
    engine = Engine(model, 4)
    engine.warm_up()
    compiled = (engine._prefill._cache_size(), engine._decode._cache_size())  # programs jax has traced
    mixed = [Sampling(max_new_tokens=n, temperature=t, top_k=k, seed=n) for n, t, k in
             [(3, 0.0, 0), (20, 1.0, 5), (1, 0.0, 0), (9, 0.7, 0), (12, 0.0, 0), (2, 1.0, 0)]]
    prompts = [p * r for p, r in zip(PROMPTS * 2, [1, 3, 1, 1, 2, 1])]
    generate(model, prompts, mixed, slots=4)
    assert (engine._prefill._cache_size(), engine._decode._cache_size()) == compiled


def test_sampling_keeps_exactly_the_top_k_and_top_p_tokens_with_their_probabilities():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.asarray(np.log(probs), jnp.float32)[None].repeat(4000, 0)
    n = logits.shape[0]

    def draw(temperature=1.0, top_k=0, top_p=1.0):
        out = sample(logits, jnp.full(n, temperature), jnp.full(n, top_k, jnp.int32), jnp.full(n, top_p),
                     jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.int32))
        return np.bincount(np.asarray(out), minlength=4) / n

    np.testing.assert_array_equal(draw(temperature=0.0), [0, 1, 0, 0])
    np.testing.assert_array_equal(draw(top_k=1), [0, 1, 0, 0])
    np.testing.assert_allclose(draw(), probs, atol=0.03)
    np.testing.assert_allclose(draw(top_k=2), [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.03)
    np.testing.assert_allclose(draw(top_p=0.7), [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.03)  # 0.5 + 0.3 reach 0.7
    np.testing.assert_allclose(draw(top_p=0.85), [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], atol=0.03)
    sharp = probs ** 2 / (probs ** 2).sum()
    np.testing.assert_allclose(draw(temperature=0.5), sharp, atol=0.03)


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


def test_scores_match_a_float64_reference_with_and_without_a_sliding_window():
    model = random_model("gpt2")
    tok = model.tokenizer
    text = "Return a new list containing all items from the iterable in ascending order. " * 2
    ids = tok.encode([text])[0] + [tok.eos_id]
    assert len(ids) > model.context  # longer than the context: needs the window
    apply = functools.partial(forward, model)
    # Stride 1: token i is predicted from BOS and the window - 1 tokens before it.
    window = 12
    expected = 0.0
    for i, target in enumerate(ids):
        context = [tok.bos_id, *ids[max(0, i - (window - 1)) : i]]
        expected += _log_softmax64(apply(context))[-1, target]
    got = Scorer(model, window=window, stride=1).score([text], eos=True)[0]
    assert got.tokens == len(ids) and got.bytes == len(text.encode())
    np.testing.assert_allclose(got.log_likelihood, expected, rtol=2e-5)
    by_chunks = Scorer(model, window=window, stride=1, chunk_len=5).score([text], eos=True)[0]  # 12 = 5 + 5 + 2
    np.testing.assert_allclose(by_chunks.log_likelihood, expected, rtol=2e-5)
    np.testing.assert_allclose(got.bits_per_byte, -expected / math.log(2) / len(text.encode()), rtol=2e-5)
    np.testing.assert_allclose(got.perplexity, math.exp(-expected / len(ids)), rtol=2e-5)
    # A text that fits is one teacher-forced pass, whatever the batch.
    short = ["Open the file", "x", "Return the value of the named attribute of object"]
    scores = Scorer(model, batch_size=2).score(short)
    for s, t in zip(scores, short):
        t_ids = tok.encode([t])[0]
        lp = _log_softmax64(apply([tok.bos_id, *t_ids[:-1]]))
        np.testing.assert_allclose(s.log_likelihood, sum(lp[j, v] for j, v in enumerate(t_ids)), rtol=2e-5)


def test_embeddings_pool_the_hidden_states_of_the_texts_tokens():
    model = random_model("llama_unscanned")
    tok = model.tokenizer
    texts = ["Open the file", "Return the value of the named attribute", "x"]
    scorer = Scorer(model, batch_size=2)
    mean, last = scorer.embed(texts), scorer.embed(texts, pooling="last")
    unit = scorer.embed(texts, normalize=True)
    for i, t in enumerate(texts):
        ids = [tok.bos_id, *tok.encode([t])[0]]
        states = forward(model, ids, hidden=True)
        np.testing.assert_allclose(mean[i], states[1:].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(last[i], states[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-5)
    with pytest.raises(RequestError, match="text 1 is empty"):
        scorer.embed(["a", ""])


def test_the_command_line_exports_generates_scores_and_embeds(run, exported, tmp_path, capsys):
    def cli(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, (json.loads(out) if code == 0 else None), err

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Return the\n{\"prompt\": \"The\"}\n")
    code, result, err = cli("generate", str(exported), "--prompt-file", str(prompts), "--max-new-tokens", "5",
                            "--temperature", "0.7", "--num-samples", "2", "--seed", "4")
    assert code == 0, err
    assert [c["prompt"] for c in result["completions"]] == ["Return the", "Return the", "The", "The"]
    # The run directory itself gives the same completions as its export.
    code, from_run, err = cli("generate", str(run), "--prompt-file", str(prompts), "--max-new-tokens", "5",
                              "--temperature", "0.7", "--num-samples", "2", "--seed", "4")
    assert code == 0 and from_run == result, err
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "Return the value."}\n{"text": "Open a file and read it.\\nThen close it."}\n')
    code, scored, err = cli("score", str(exported), str(texts), "--eos")
    assert code == 0, err
    assert len(scored["texts"]) == 2 and scored["total"]["bytes"] == sum(t["bytes"] for t in scored["texts"])
    code, embedded, err = cli("embed", str(exported), str(texts), "--output", str(tmp_path / "e.npy"), "--normalize")
    assert code == 0 and embedded["texts"] == 2, err
    assert np.load(tmp_path / "e.npy").shape == (2, 32)
    # eval takes an export wherever it takes a run directory, with the same result.
    code, from_export, err = cli("eval", str(exported))
    assert code == 0, err
    code, from_checkpoint, err = cli("eval", str(run))
    assert code == 0 and from_export == from_checkpoint, err
    # Bad requests name what to change.
    for argv, message in [
        (["generate", str(exported), "--prompt", "x" * 200], "prompt: is"),
        (["generate", str(exported), "--prompt", "a", "--temperature", "-1"], "temperature: must be"),
        (["generate", str(exported), "--prompt", "a", "--max-new-tokens", "0"], "max_new_tokens: must be"),
        (["generate", str(exported), "--prompt", "a", "model.d_model=8"], "only mesh.* settings"),
        (["score", str(exported), str(tmp_path / "missing.txt")], "cannot read"),
        (["embed", str(exported), str(texts), "--output", str(tmp_path / "e.csv")], "must end in .npy or .jsonl"),
        (["export", str(run), "--output", str(exported)], "not an empty directory"),
    ]:
        code, _, err = cli(*argv)
        assert code == 1 and message in err, (argv, err)


SERVING_CLIENT = """
import json, sys
import numpy as np
from jax import export
from safetensors.numpy import load_file

folder, tokens, prompt = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
params = load_file(f"{folder}/model.safetensors")
fn = {n: export.deserialize(open(f"{folder}/{n}.jax_exported", "rb").read()) for n in ("logits", "prefill", "decode")}
logits = np.asarray(fn["logits"].call(params, np.array(tokens, np.int32)))
# Greedy decoding of two prompts of different lengths, padded on the right.
lengths = np.array([len(p) for p in prompt], np.int32)
padded = np.zeros((len(prompt), lengths.max()), np.int32)
for i, p in enumerate(prompt):
    padded[i, : len(p)] = p
last, cache = fn["prefill"].call(params, padded, lengths)
out = [[] for _ in prompt]
for _ in range(5):
    token = np.asarray(last).argmax(-1).astype(np.int32)
    for i, t in enumerate(token):
        out[i].append(int(t))
    last, cache = fn["decode"].call(params, cache, token, lengths)
    lengths = lengths + 1
assert not any(m.startswith("t2x") for m in sys.modules)
print(json.dumps({"logits": logits.tolist(), "greedy": out}))
"""


def test_serving_functions_run_from_jax_export_alone(run, tmp_path):
    folder = tmp_path / "serving"
    export_run(str(run), str(folder), fmt="stablehlo")
    model = load(str(folder))  # still an export t2x reads, its new files checked too
    assert {"logits.jax_exported", "SERVING.md"} <= set(json.loads((folder / "manifest.json").read_text())["files"])
    tokens = np.random.default_rng(0).integers(0, 512, (3, 7)).tolist()
    prompts = [[model.tokenizer.bos_id, *ids] for ids in model.tokenizer.encode(["Return the", "A new list of"])]
    out = subprocess.run([sys.executable, "-c", SERVING_CLIENT, str(folder), json.dumps(tokens), json.dumps(prompts)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    expected = np.asarray(_apply(model.cfg.model, False)(model.params, np.array(tokens, np.int32)))
    np.testing.assert_allclose(np.array(result["logits"]), expected, rtol=1e-5, atol=1e-5)
    greedy = generate(model, ["Return the", "A new list of"], Sampling(max_new_tokens=5))
    for got, c in zip(result["greedy"], greedy):  # t2x stops at EOS; the loop above does not
        assert got[: len(c.tokens) + 1] == c.tokens + ([model.tokenizer.eos_id] if c.finish_reason == "eos" else [])


def test_t2x_serve_answers_http_on_loopback_and_stops_on_sigterm(exported):
    """The command a user runs: `t2x serve EXPORT --port N`, queried as curl would."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "t2x.cli", "serve", str(exported), "--port", str(port),
                               "--slots", "2", "--max-batch", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-2000:]
                time.sleep(0.5)
        body = json.dumps({"prompt": "Return the", "max_new_tokens": 6}).encode()
        request = urllib.request.Request(f"{url}/v1/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        expected = generate(load(str(exported)), ["Return the"], Sampling(max_new_tokens=6))[0]
        assert answer["tokens"] == expected.tokens and answer["text"] == expected.text
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    # uvicorn shuts down cleanly, then ends by the signal it caught.
    log = server.stderr.read()
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log[-2000:]
