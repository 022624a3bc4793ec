"""Hugging Face format for encoder-decoders: export as ``T5ForConditionalGeneration`` and
import back, checked against ``transformers`` with the same weights; T5 checkpoints made
by ``transformers`` imported; refusals."""

import functools
import json

import jax
import numpy as np
import pytest

from conftest import tiny_config
from t2x.cli import main
from t2x.data.tokenizer import from_files, load_tokenizer
from t2x.export import Exported, ExportError, read_export
from t2x.families import family
from t2x.hf import T5, architecture, read_hf, t5, write_hf
from t2x.models import EncoderDecoder, abstract_params
from test_encdec import padded_inputs
from test_hf import assert_close, held_out

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The tiny test shapes as a T5 1.0: 512 pieces, then the sentinels.
T5_1_0 = ["model.family=encoder_decoder", "model.vocab_size=576", "model.position=relative",
          "model.relative_buckets=8", "model.relative_max_distance=16", "model.mlp=relu", "model.norm=rmsnorm",
          "model.norm_eps=1e-6", "model.use_bias=false", "model.num_decoder_layers=2"]
VARIANTS = {
    "t5_1_0_tied_scanned": [],
    # T5 1.1: GELU-gated, its own output projection; a deeper decoder, unrolled layers.
    "t5_1_1_untied_geglu_unscanned": ["model.mlp=geglu", "model.tie_embeddings=false", "model.num_decoder_layers=3",
                                      "model.scan_layers=false"],
}


def encoder_decoder(*overrides):
    """A tiny T5 config and random parameters of its shapes (norm scales around 1: an
    init's ones would hide a swapped or missing tensor)."""
    cfg = tiny_config("/nonexistent", *T5_1_0, *overrides)
    shapes, _ = abstract_params(EncoderDecoder(cfg.model), 8)
    rng = np.random.default_rng(3)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return 1 + 0.2 * noise if path[-1].key == "scale" else 0.3 * noise

    return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _apply(m):
    return jax.jit(EncoderDecoder(m).apply)


def ours(m, params, enc, dec, enc_seg, dec_seg):
    """t2x's logits; padding has segment id 0."""
    return np.asarray(_apply(m)({"params": params}, enc, dec, encoder_segment_ids=enc_seg,
                                decoder_segment_ids=dec_seg))


def theirs(model, enc, dec, enc_seg, dec_seg):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc_seg),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long),
                     decoder_attention_mask=torch.tensor(dec_seg)).logits.numpy()


def assert_same_logits(m, params, hf, vocab):
    """t2x's and transformers' logits agree at the real decoder tokens of a padded batch."""
    enc, dec, enc_seg, dec_seg = padded_inputs(np.random.default_rng(0), 3, 13, 9, vocab)
    a, b = ours(m, params, enc, dec, enc_seg, dec_seg), theirs(hf, enc, dec, enc_seg, dec_seg)
    real = dec_seg > 0
    assert np.abs(b[real]).max() > 0.5  # weights large enough that a mismatch would show
    assert_close(a[real], b[real])


def assert_loadable(params, m):
    """``params`` are the tree, shapes and dtype ``EncoderDecoder(m)`` builds."""
    shapes, _ = abstract_params(EncoderDecoder(m), 8)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for want, got in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)):
        assert want.shape == got.shape and got.dtype == np.float32


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_t5_export_gives_transformers_our_logits_and_imports_back_bit_for_bit(variant, tmp_path):
    cfg, params = encoder_decoder(*VARIANTS[variant])
    m, tokenizer = cfg.model, load_tokenizer(cfg.data.tokenizer)
    out = tmp_path / "hf"
    config = write_hf(str(out), Exported(cfg, params, tokenizer.files, {"kind": "test", "path": variant}))
    assert config["architectures"] == [T5] and config["model_type"] == "t5"
    assert config["feed_forward_proj"] == {"relu": "relu", "geglu": "gated-gelu"}[m.mlp]
    assert config["num_decoder_layers"] == m.decoder_layers and config["d_kv"] == m.head_size
    assert config["decoder_start_token_id"] == tokenizer.bos_id  # t2x's start of every target
    assert json.loads((out / "generation_config.json").read_text())["decoder_start_token_id"] == tokenizer.bos_id
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    tied = hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr()
    assert tied == m.tie_embeddings and hf.config.scale_decoder_outputs == m.tie_embeddings
    assert_same_logits(m, params, hf, m.vocab_size)
    # Importing the export gives back the same model settings and parameters.
    back = read_hf(str(out))
    for key in ("family", "position", "relative_buckets", "relative_max_distance", "mlp", "norm", "norm_eps",
                "use_bias", "tie_embeddings", "num_layers", "num_decoder_layers", "d_ff", "vocab_size"):
        assert getattr(back.cfg.model, key) == getattr(m, key), key
    assert_loadable(back.params, back.cfg.model)
    expected, got = t5.tensors(m, params), t5.tensors(back.cfg.model, back.params)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


@pytest.mark.parametrize("mlp", ["swiglu", "gelu_exact", "gelu"])
def test_the_other_mlps_export_as_their_feed_forward_proj(mlp, tmp_path):
    cfg, params = encoder_decoder(f"model.mlp={mlp}", "model.tie_embeddings=false")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    config = write_hf(str(tmp_path / "hf"), Exported(cfg, params, tokenizer.files, {"kind": "test", "path": mlp}))
    assert config["feed_forward_proj"] == {"swiglu": "gated-silu", "gelu_exact": "gelu", "gelu": "gelu_new"}[mlp]
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert_same_logits(cfg.model, params, hf, cfg.model.vocab_size)
    assert read_hf(str(tmp_path / "hf")).cfg.model.mlp == mlp


def test_the_exported_tokenizer_reads_text_as_t2x_with_eos_and_sentinels(tmp_path):
    cfg, params = encoder_decoder()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    write_hf(str(tmp_path / "hf"), Exported(cfg, params, tokenizer.files, {"kind": "test", "path": "t5"}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    eos, texts = tokenizer.eos_id, held_out(12)
    assert [hf(t)["input_ids"] for t in texts] == [[*ids, eos] for ids in tokenizer.encode(texts)]  # text EOS
    # The sentinels, <extra_id_k>, are the ids span corruption trained with.
    sentinels = family("encoder_decoder").reserved_ids(cfg, tokenizer)
    assert len(sentinels) >= 2 and sentinels[0] == tokenizer.vocab_size
    assert hf.convert_ids_to_tokens(sentinels) == [f"<extra_id_{k}>" for k in range(len(sentinels))]
    ids = hf("Return the <extra_id_0> of <extra_id_1>.")["input_ids"]
    assert ids[-1] == eos and [i for i in ids if i >= tokenizer.vocab_size] == sentinels[:2]
    # The import reads the tokenizer back as it was: the same BOS (the decoder's start),
    # EOS, vocabulary and so the same sentinel ids.
    back = read_hf(str(tmp_path / "hf"))
    read = from_files(back.tokenizer_files, "imported")
    assert (read.bos_id, read.eos_id, read.vocab_size) == (tokenizer.bos_id, eos, tokenizer.vocab_size)
    assert read.encode(texts) == tokenizer.encode(texts)
    assert family("encoder_decoder").reserved_ids(back.cfg, read) == sentinels


# T5 checkpoints made by transformers: its own conventions (decoder start = pad = 0, EOS
# 1, sentinels <extra_id_k> counting down from the last id).
HF_VARIANTS = {
    "t5_1_0": {"feed_forward_proj": "relu", "tie_word_embeddings": True, "num_decoder_layers": 2},
    "t5_1_1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "num_decoder_layers": 3},
    # transformers 5 ties an untied T5's lm_head unless it is given its own: unscaled, tied.
    "t5_1_1_head_of_the_embedding": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                                     "num_decoder_layers": 3},
}


def _t5_tokenizer(texts, extra_ids=8):
    """A SentencePiece-style unigram tokenizer laid out as T5's: <pad> 0, </s> 1, <unk> 2,
    the pieces, then <extra_id_k> counting down; EOS after the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                               unk_token="<unk>"))
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    extra = [f"<extra_id_{k}>" for k in reversed(range(extra_ids))]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=unigram, eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>", additional_special_tokens=extra)


@pytest.fixture(scope="module")
def hf_t5s(tmp_path_factory):
    """Randomly initialized transformers T5s (every weight perturbed) and their tokenizer,
    saved with save_pretrained; ``{variant: (model, directory)}``."""
    tokenizer = _t5_tokenizer(held_out(300))
    out = {}
    for i, (name, settings) in enumerate(sorted(HF_VARIANTS.items())):
        config = transformers.T5Config(vocab_size=136, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                       dropout_rate=0.0, **settings)
        torch.manual_seed(i)
        model = transformers.T5ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        if name == "t5_1_1":
            model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn_like(model.lm_head.weight))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_a_transformers_t5_imports_with_its_logits_and_decoder_start(variant, hf_t5s, tmp_path, capsys):
    hf, path = hf_t5s[variant]
    code = main(["import-hf", str(path), "--output", str(tmp_path / "export")])
    manifest = json.loads(capsys.readouterr().out)
    assert code == 0 and manifest["source"]["architecture"] == T5 and manifest["family"] == "encoder_decoder"
    exported = read_export(str(tmp_path / "export"))
    m = exported.cfg.model
    assert (m.mlp, m.num_decoder_layers, m.tie_embeddings) == (
        {"relu": "relu", "gated-gelu": "geglu"}[hf.config.feed_forward_proj], hf.config.num_decoder_layers,
        variant == "t5_1_0")
    assert_loadable(exported.params, m)
    assert_same_logits(m, exported.params, hf, 120)
    # The tokenizer's BOS is T5's decoder start (pad, 0); EOS and T5's sentinels stay its own.
    tokenizer = from_files(exported.tokenizer_files, "imported")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, len(hf_tokenizer))
    texts = held_out(20)
    assert [[*ids, 1] for ids in tokenizer.encode(texts)] == [hf_tokenizer(t)["input_ids"] for t in texts]
    # Greedy generation starts where transformers' does and writes the same tokens.
    prompt = texts[3][:40]
    assert main(["generate", str(tmp_path / "export"), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    generated = json.loads(capsys.readouterr().out)["completions"][0]["tokens"]
    with torch.no_grad():
        expected = hf.generate(hf_tokenizer(prompt, return_tensors="pt")["input_ids"], max_new_tokens=8,
                               do_sample=False, decoder_start_token_id=0,  # T5's: pad
                               use_cache=False)[0].tolist()  # transformers' cache has num_layers decoder layers
    assert expected[0] == 0 and generated == [t for t in expected[1:] if t not in (0, 1)]  # start, then until EOS
    # Exported again, it is the model it was, starting from pad, with T5's sentinels.
    config = write_hf(str(tmp_path / "again"), exported)
    assert config["decoder_start_token_id"] == 0
    again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "again", attn_implementation="eager")
    assert_same_logits(m, exported.params, again.eval(), 120)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").get_vocab() == hf_tokenizer.get_vocab()


def test_configs_t5_cannot_express_are_refused_naming_the_key():
    for overrides, option in [
        (["model.position=sinusoidal"], "model.position=sinusoidal"),
        (["model.position=learned"], "model.position=learned"),
        (["model.position=rope"], "model.position=rope"),
        (["model.norm=layernorm"], "model.norm=layernorm"),
        (["model.use_bias=true"], "model.use_bias=true"),
        (["model.norm_position=post"], "model.norm_position=post"),
        (["model.num_kv_heads=2"], "model.num_kv_heads=2"),
    ]:
        with pytest.raises(ExportError, match=option):
            architecture(tiny_config("/nonexistent", *T5_1_0, *overrides).model)


def test_t5_imports_t2x_cannot_reproduce_are_refused(hf_t5s, tmp_path, capsys):
    def variant(name, source, key, value):
        d = tmp_path / name
        d.mkdir()
        for f in hf_t5s[source][1].iterdir():
            d.joinpath(f.name).write_bytes(f.read_bytes())
        config = json.loads((d / "config.json").read_text())
        config[key] = value
        (d / "config.json").write_text(json.dumps(config))
        return d

    for name, source, key, value, message in [
        ("act", "t5_1_0", "feed_forward_proj", "gated-relu", "feed_forward_proj='gated-relu'"),
        # its own lm_head, yet scaled as a tied projection
        ("scaled", "t5_1_1", "scale_decoder_outputs", True, "scale_decoder_outputs=True"),
        ("start", "t5_1_0", "decoder_start_token_id", 500, "decoder_start_token_id=500"),
    ]:
        code = main(["import-hf", str(variant(name, source, key, value)), "--output", str(tmp_path / f"out-{name}")])
        err = capsys.readouterr().err
        assert code == 1 and message in err, (name, err)
        assert not (tmp_path / f"out-{name}").exists()


def test_an_imported_t5_corrupts_spans_with_its_own_sentinels_and_reads_them_in_prompts(hf_t5s, tmp_path, capsys):
    """T5's <extra_id_k> are tokens of its own vocabulary (k=0 the last id, counting
    down): its import's span corruption writes them, k=0 first as T5's does, and reserves
    no id past the vocabulary; generation reads and writes them."""
    from t2x.config import ConfigError, load_config
    from t2x.families import span_corruption
    from t2x.infer.model import load
    from t2x.infer.seq2seq import Seq2Seq
    from test_span_corruption import _rows

    hf, path = hf_t5s["t5_1_0"]
    export = tmp_path / "export"
    assert main(["import-hf", str(path), "--output", str(export)]) == 0
    capsys.readouterr()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    own = hf_tokenizer.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(8)])
    tokenizer = load_tokenizer(str(export))
    assert tokenizer.sentinel_ids() == own == list(range(127, 119, -1))
    # The import's rows (data.seq_len=512) may need more sentinels than its 8: refused by
    # name, by the check a run makes before it starts too.
    imported = load_config(export / "config.yaml")
    for check in (span_corruption, family("encoder_decoder").reserved_ids):
        with pytest.raises(ConfigError, match=r"has 8 sentinels of its own .*data.seq_len=512 rows may need 28"):
            check(imported, tokenizer)
    (tmp_path / "text.txt").write_text("\n".join(held_out(60)) + "\n")
    cfg = load_config(export / "config.yaml", [f"data.tokenizer={export}", "data.seq_len=32", "data.source=files",
                                               f"data.train_files=[{tmp_path / 'text.txt'}]", "data.num_shards=1"])
    assert span_corruption(cfg, tokenizer).sentinel_ids.tolist() == own[:2]  # 34 raw tokens: 2 noise spans
    assert family("encoder_decoder").reserved_ids(cfg, tokenizer) == []
    _, rows = _rows(cfg)
    pieces = [(r["tokens"][r["segment_ids"] == s], r["targets"][r["target_segment_ids"] == s])
              for r in rows for s in range(1, r["segment_ids"].max() + 1)]
    assert len(pieces) > 20
    for inputs, targets in pieces:
        used = [t for t in inputs if t >= 120]  # T5's sentinels; the text's own tokens are below them
        assert used == own[: len(used)] and used  # <extra_id_0>, <extra_id_1>, ... in order
        assert [t for t in targets if t >= 120] == used and targets[0] == own[0]
    # Generation reads <extra_id_k> as T5's ids, as transformers' tokenizer does, and
    # writes them back so.
    seq2seq = Seq2Seq(load(str(export)))
    prompt = "The <extra_id_0> sat on <extra_id_1>."
    assert seq2seq.sentinels == own and seq2seq.inputs([prompt])[0] == hf_tokenizer(prompt)["input_ids"]
    cat = tokenizer.encode(["cat"])[0]
    assert seq2seq.decode([own[0], *cat, own[1], 130]) == "<extra_id_0>cat<extra_id_1>"  # 130: the model's padding
    assert main(["generate", str(export), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    generated = json.loads(capsys.readouterr().out)["completions"][0]["tokens"]
    with torch.no_grad():
        expected = hf.generate(hf_tokenizer(prompt, return_tensors="pt")["input_ids"], max_new_tokens=8,
                               do_sample=False, decoder_start_token_id=0, use_cache=False)[0].tolist()
    assert generated == [t for t in expected[1:] if t not in (0, 1)]
