"""Generation from encoder-decoders: greedy and beam search with the decoding cache equal
plain searches over full forward passes; sampling per row; the CLI and the server."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2x.data.tokenizer import load_tokenizer
from t2x.export import Exported
from t2x.infer.engine import RequestError, generate
from t2x.infer.model import place
from t2x.infer.sampling import Sampling
from t2x.infer.seq2seq import Seq2Seq, length_penalty
from t2x.models import abstract_params
from t2x.models.encdec import EncoderDecoder
from test_seq2seq import seq2seq_config

INPUTS = ["Return the sorted list.", "Open the file and read it.", "x", "A longer input about the modules "
          "that read files."]


@pytest.fixture(scope="module")
def model():
    """A tiny T5 with random parameters large enough that its distributions are peaked
    (no near-ties between the cached and the reference searches)."""
    cfg = seq2seq_config("/nonexistent")
    module = EncoderDecoder(cfg.model)
    shapes, _ = abstract_params(module, 8)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (1.0 if x.ndim == 1 else 0.5) * rng.standard_normal(x.shape).astype(np.float32)
                          + (1.0 if x.ndim == 1 else 0.0), shapes)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    return place(Exported(cfg, params, tokenizer.files, {"kind": "test", "path": "t5"}))


def full_log_probs(model):
    """float64 next-token log-probabilities of a decoder prefix, from full forward passes
    without a cache: f(input ids, prefixes [rows, length]) -> [rows, vocab] at each row's
    last real position (given as lengths)."""
    forward = jax.jit(EncoderDecoder(model.cfg.model).apply)

    def log_probs(ids, prefixes):
        width = 32
        enc = np.zeros((len(prefixes), width), np.int32)
        enc[:, : len(ids)] = ids
        seg = (enc > 0).astype(np.int32)
        dec = np.zeros((len(prefixes), width), np.int32)
        for r, p in enumerate(prefixes):
            dec[r, : len(p)] = p
        logits = np.asarray(forward({"params": model.params}, enc, dec, encoder_segment_ids=seg), np.float64)
        last = logits[np.arange(len(prefixes)), [len(p) - 1 for p in prefixes]]
        return last - np.log(np.exp(last - last.max(-1, keepdims=True)).sum(-1, keepdims=True)) - last.max(-1, keepdims=True)

    return log_probs


def reference_beam(log_probs, ids, bos, eos, beams, alpha, limit):
    """Beam search written plainly: every live hypothesis extended by every token, the 2k
    best kept; those ending in EOS join the finished (ranked by log-probability over the
    length penalty), the k best others stay live; it stops at ``limit`` tokens or when the
    best live one can no longer beat the worst of k finished."""
    live, finished = [((), 0.0)], []
    for i in range(limit):
        lp = log_probs(ids, [[bos, *h] for h, _ in live])
        candidates = sorted(((s + lp[r, v], h + (v,)) for r, (h, s) in enumerate(live) for v in range(lp.shape[1])),
                            reverse=True)[: 2 * beams]
        finished = sorted(finished + [(s / length_penalty(i + 1.0, alpha), h) for s, h in candidates if h[-1] == eos],
                          reverse=True)[:beams]
        live = [(h, s) for s, h in candidates if h[-1] != eos][:beams]
        worst = finished[-1][0] if len(finished) == beams else -math.inf
        if live[0][1] / length_penalty(float(limit), alpha) < worst:
            break
    return list(finished[0][1] if finished else live[0][0])


def test_greedy_decoding_with_the_cache_equals_full_forward_passes(model):
    tok = model.tokenizer
    log_probs = full_log_probs(model)
    limit = 12
    got = Seq2Seq(model).generate(INPUTS, Sampling(max_new_tokens=limit))
    for text, completion in zip(INPUTS, got):
        ids = [*tok.encode([text])[0], tok.eos_id]
        out = []
        while len(out) < limit:
            token = int(np.argmax(log_probs(ids, [[tok.bos_id, *out]])[0]))
            if token == tok.eos_id:
                break
            out.append(token)
        assert completion.tokens == out
        assert completion.finish_reason == ("eos" if len(out) < limit else "length")
        assert completion.text == Seq2Seq(model).decode(out) and completion.prompt_tokens == len(ids) - 1


@pytest.mark.parametrize("beams, alpha", [(3, 0.6), (2, 0.0)])
def test_beam_search_with_the_cache_equals_a_plain_beam_search(model, beams, alpha):
    tok = model.tokenizer
    log_probs = full_log_probs(model)
    limit = 6
    got = Seq2Seq(model).generate(INPUTS, Sampling(max_new_tokens=limit, num_beams=beams, length_penalty=alpha))
    for text, completion in zip(INPUTS, got):
        ids = [*tok.encode([text])[0], tok.eos_id]
        expected = reference_beam(log_probs, ids, tok.bos_id, tok.eos_id, beams, alpha, limit)
        assert completion.tokens == [t for t in expected if t != tok.eos_id]
        assert completion.finish_reason == ("eos" if tok.eos_id in expected else "length")


def test_sampling_is_per_row_and_settings_are_checked(model):
    seq2seq = Seq2Seq(model)
    hot = Sampling(max_new_tokens=10, temperature=1.0, seed=7)
    alone = seq2seq.generate([INPUTS[0]], hot)[0]
    mixed = seq2seq.generate(INPUTS, [Sampling(max_new_tokens=5), hot, hot, Sampling(max_new_tokens=3)])
    # The same seed and input give the same tokens whatever shares the batch.
    assert seq2seq.generate(INPUTS[1:2] + INPUTS[:1], [Sampling(), hot])[1].tokens == alone.tokens
    assert mixed[1].tokens == seq2seq.generate([INPUTS[1]], hot)[0].tokens
    assert len(mixed[3].tokens) <= 3 and len(mixed[0].tokens) <= 5
    # Stop strings cut the text, as the decoder family's do.
    first = seq2seq.generate([INPUTS[0]], Sampling(max_new_tokens=12))[0]
    if len(first.text) > 2:
        stop = first.text[1:3]
        cut = seq2seq.generate([INPUTS[0]], Sampling(max_new_tokens=12, stop=(stop,)))[0]
        assert cut.finish_reason == "stop" and cut.text == first.text[: first.text.find(stop)]
        assert first.tokens[: len(cut.tokens)] == cut.tokens and stop in seq2seq.decode(cut.tokens)
    with pytest.raises(RequestError, match="temperature"):
        seq2seq.generate(INPUTS[:1], Sampling(num_beams=2, temperature=0.5))
    with pytest.raises(RequestError, match="num_beams"):
        seq2seq.generate(INPUTS[:1], Sampling(num_beams=0))
    with pytest.raises(RequestError, match="prompt: is .* tokens; the encoder reads at most"):
        seq2seq.generate(["word " * 200], Sampling())
    # T5's sentinel spellings read as the sentinel ids, and are written so.
    sentinels = seq2seq.sentinels
    assert seq2seq.inputs(["The <extra_id_0> sat on <extra_id_1>."])[0] == [
        *model.tokenizer.encode(["The "])[0], sentinels[0], *model.tokenizer.encode([" sat on "])[0], sentinels[1],
        *model.tokenizer.encode(["."])[0], model.tokenizer.eos_id]
    ids = model.tokenizer.encode(["cat"])[0]
    assert seq2seq.decode([sentinels[0], *ids, sentinels[1], model.cfg.model.vocab_size - 1]) == "<extra_id_0>cat<extra_id_1>"
    with pytest.raises(RequestError, match="extra_id_999"):
        seq2seq.generate(["<extra_id_999>"], Sampling())
    # The engine's generate takes encoder-decoders the same way.
    assert [c.tokens for c in generate(model, INPUTS[:2], Sampling(max_new_tokens=4))] == [
        c.tokens for c in seq2seq.generate(INPUTS[:2], Sampling(max_new_tokens=4))]


def test_a_decoder_refuses_beam_search(tmp_path):
    from conftest import tiny_config
    from t2x.infer.engine import Engine
    from t2x.models import build_model

    cfg = tiny_config(tmp_path)
    shapes, _ = abstract_params(build_model(cfg.model), 8)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    decoder = place(Exported(cfg, params, load_tokenizer(cfg.data.tokenizer).files, {"kind": "test", "path": "d"}))
    with pytest.raises(RequestError, match="num_beams: beam search decodes encoder-decoders"):
        Engine(decoder, 1).encode("x", Sampling(num_beams=2))


def test_the_server_generates_from_an_encoder_decoder(model):
    import json

    from t2x.infer.score import Scorer
    from test_server import LIMITS, call, serving

    beam = Sampling(max_new_tokens=6, num_beams=3)
    expected = Seq2Seq(model).generate(INPUTS[:2], [Sampling(max_new_tokens=6), beam])
    with serving(model) as url:
        status, body = call(url, "/v1/generate", {"prompt": INPUTS[0], "max_new_tokens": 6})
        assert status == 200 and json.loads(body)["tokens"] == expected[0].tokens
        status, body = call(url, "/v1/generate", {"prompt": INPUTS[1], "max_new_tokens": 6, "num_beams": 3,
                                                  "stream": True})
        events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
        assert status == 200 and events[0] == {"text": expected[1].text}
        assert events[-1]["done"] and events[-1]["tokens"] == expected[1].tokens
        for bad, field in (({"num_beams": 2, "temperature": 1.0}, "temperature"), ({"num_beams": 99}, "num_beams"),
                           ({"prompt": "word " * 200}, "prompt"), ({"max_new_tokens": LIMITS.max_new_tokens + 1},
                                                                   "max_new_tokens")):
            status, body = call(url, "/v1/generate", {"prompt": "x", **bad})
            assert status == 422 and json.loads(body)["error"]["field"] == field, body
        assert call(url, "/v1/score", {"texts": ["x"]})[0] == 422
        status, body = call(url, "/v1/embed", {"texts": INPUTS[:2], "pooling": "max"})
        np.testing.assert_allclose(json.loads(body)["embeddings"], Scorer(model).embed(INPUTS[:2], "max"), rtol=1e-5)


def test_the_cli_generates_from_an_encoder_decoder_export(model, tmp_path, capsys):
    import json

    from t2x.cli import main
    from t2x.export import write_export

    beam = Sampling(max_new_tokens=6, num_beams=3)
    expected = Seq2Seq(model).generate(INPUTS[:1], [Sampling(max_new_tokens=6)])
    # The CLI reads an export and decodes the same, greedy and beam search alike.
    write_export(str(tmp_path / "export"), model.cfg, jax.device_get(model.params), model.tokenizer.files,
                 {"kind": "test", "path": "t5"}, "float32")
    for flags, want in (([], expected[0]), (["--num-beams", "3"], Seq2Seq(model).generate(INPUTS[:1], beam)[0])):
        assert main(["generate", str(tmp_path / "export"), "--prompt", INPUTS[0], "--max-new-tokens", "6", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["completions"][0]["tokens"] == want.tokens


def test_an_encoder_decoder_embeds_with_its_encoder(model):
    from t2x.infer.score import Scorer

    tok = model.tokenizer
    vectors = Scorer(model).embed(INPUTS, "mean", normalize=False)
    maxed = Scorer(model).embed(INPUTS[:1], "max")
    for text, vector in zip(INPUTS, vectors):
        ids = np.array([[*tok.encode([text])[0], tok.eos_id]], np.int32)  # the encoder's row, alone
        states = np.asarray(EncoderDecoder(model.cfg.model).apply({"params": model.params}, ids, method="encode"))[0]
        np.testing.assert_allclose(vector, states[:-1].mean(0), rtol=1e-4, atol=1e-5)  # the text's tokens, not EOS
        if text == INPUTS[0]:
            np.testing.assert_allclose(maxed[0], states[:-1].max(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(RequestError, match="pools mean, max"):
        Scorer(model).embed(INPUTS, "cls")
