"""Hugging Face format for encoders: export as ``BertForMaskedLM`` (``BertForPreTraining``
with the next-sentence head) and import back, checked against ``transformers`` with the
same weights; BERT checkpoints made by ``transformers`` imported; refusals."""

import functools
import json

import jax
import numpy as np
import pytest

from conftest import tiny_config
from t2x.cli import main
from t2x.data.tokenizer import from_files, load_tokenizer
from t2x.export import Exported, ExportError, relayout
from t2x.families import masking_tokens
from t2x.hf import BERT, architecture, read_hf, write_hf
from t2x.models import EncoderMLM, abstract_params
from test_hf import assert_close, held_out

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The tiny test shapes as a BERT: 512 pieces and the mask token past them.
ENCODER = ["model.family=encoder", "model.vocab_size=576", "model.mlp=gelu_exact", "model.norm_position=post",
           "model.embed_norm=true", "model.type_vocab_size=2", "model.norm_eps=1e-12", "model.init_std=0.3"]
VARIANTS = {
    "scanned_exact_gelu": [],
    # Without token types, BERT gets a one-row table of zeros: the same outputs.
    "unscanned_tanh_gelu_untied_no_types": ["model.scan_layers=false", "model.mlp=gelu", "model.tie_embeddings=false",
                                            "model.type_vocab_size=0"],
}
LENGTHS = (32, 20, 9, 3)  # real tokens of each row of the test batch; the rest is padding


def encoder(*overrides, next_sentence=False):
    """A tiny encoder config and random parameters of its shapes: biases random too, and
    norm scales around 1 (an init's zeros and ones would hide a swapped or missing tensor)."""
    cfg = tiny_config("/nonexistent", *ENCODER, *overrides)
    shapes, _ = abstract_params(EncoderMLM(cfg.model, next_sentence=next_sentence), 8)
    rng = np.random.default_rng(2)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return 1 + 0.2 * noise if path[-1].key == "scale" else 0.3 * noise

    return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


def batch(m):
    """Random tokens, real-token masks (1 then 0) and token types (with two types or
    more, sentence B in the second half of the last two rows' real tokens), [rows, 32]
    each, for model config ``m``."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, m.vocab_size, (len(LENGTHS), 32)).astype(np.int32)
    real = (np.arange(32) < np.array(LENGTHS)[:, None]).astype(np.int32)
    types = np.zeros_like(tokens)
    for row in (2, 3):
        types[row, LENGTHS[row] // 2 : LENGTHS[row]] = m.type_vocab_size >= 2
    return tokens, real, types


@functools.cache
def _apply(m, next_sentence):
    module = EncoderMLM(m, next_sentence=next_sentence)
    return jax.jit(lambda params, tokens, real, types: module.apply(
        {"params": params}, tokens, segment_ids=real, token_types=types))


def ours(cfg, params, tokens, real, types, next_sentence=False):
    """t2x's logits (and next-sentence logits) of the batch; padding has segment id 0."""
    out = _apply(cfg.model, next_sentence)(params, tokens, real, types)
    return jax.tree.map(np.asarray, out)


def theirs(model, tokens, real, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(real),
                     token_type_ids=torch.tensor(types, dtype=torch.long))


def assert_close_where_real(a, b, real):
    for row, n in enumerate(real.sum(1)):
        assert_close(a[row, :n], b[row, :n])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_bert_export_gives_transformers_our_logits_and_imports_back_bit_for_bit(variant, tmp_path):
    cfg, params = encoder(*VARIANTS[variant])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    out = tmp_path / "hf"
    config = write_hf(str(out), Exported(cfg, params, tokenizer.files, {"kind": "test", "path": variant}))
    assert config["architectures"] == [BERT] and config["model_type"] == "bert"
    assert config["hidden_act"] == {"gelu_exact": "gelu", "gelu": "gelu_new"}[cfg.model.mlp]
    hf = transformers.BertForMaskedLM.from_pretrained(out).eval()
    tied = hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    assert tied == cfg.model.tie_embeddings
    tokens, real, types = batch(cfg.model)
    assert_close_where_real(ours(cfg, params, tokens, real, types), theirs(hf, tokens, real, types).logits.numpy(),
                            real)
    # Importing the export gives back the same parameters and model settings.
    back = read_hf(str(out))
    for key in ("family", "mlp", "norm_position", "embed_norm", "type_vocab_size", "norm_eps", "tie_embeddings"):
        assert getattr(back.cfg.model, key) == getattr(cfg.model, key), key
    expected = relayout(params, back.cfg.model)
    assert jax.tree.structure(expected) == jax.tree.structure(back.params)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(back.params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_the_exported_tokenizer_frames_rows_as_t2x_and_holds_the_mask_token(tmp_path):
    cfg, params = encoder()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    write_hf(str(tmp_path / "hf"), Exported(cfg, params, tokenizer.files, {"kind": "test", "path": "bert"}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    texts = held_out(12)
    assert [hf(t)["input_ids"] for t in texts] == [[bos, *ids, eos] for ids in tokenizer.encode(texts)]
    pair = hf(texts[0], texts[1])
    a, b = tokenizer.encode(texts[:2])
    assert pair["input_ids"] == [bos, *a, eos, *b, eos]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    mask = masking_tokens(tokenizer, cfg.model.vocab_size).mask  # the id the encoder trained with
    assert mask == tokenizer.vocab_size and hf.mask_token == "<mask>" and hf.mask_token_id == mask
    assert mask in hf(f"Return the {hf.mask_token} of the list.")["input_ids"]
    assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id) == (bos, eos, tokenizer.processor.pad_id())
    # The import reads the same tokenizer back, the mask token included.
    back = from_files(read_hf(str(tmp_path / "hf")).tokenizer_files, "imported")
    assert (back.bos_id, back.eos_id, back.mask_id) == (bos, eos, mask)
    assert back.encode(texts) == tokenizer.encode(texts)
    # Training on the import masks as before: random replacements stay below the mask.
    assert back.vocab_size == mask + 1
    ours_, imported = (masking_tokens(t, cfg.model.vocab_size) for t in (tokenizer, back))
    assert (imported.mask, imported.vocab, imported.keep) == (ours_.mask, ours_.vocab, ours_.keep) == (mask, mask, (bos, eos))


def test_a_next_sentence_model_exports_as_bert_for_pretraining(tmp_path):
    cfg, params = encoder(next_sentence=True)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    config = write_hf(str(tmp_path / "hf"), Exported(cfg, params, tokenizer.files, {"kind": "test", "path": "nsp"}))
    assert config["architectures"] == ["BertForPreTraining"]
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    tokens, real, types = batch(cfg.model)
    logits, heads = ours(cfg, params, tokens, real, types, next_sentence=True)
    out = theirs(hf, tokens, real, types)
    assert_close_where_real(logits, out.prediction_logits.numpy(), real)
    assert_close(heads["next_sentence"][:, 0], out.seq_relationship_logits.numpy())  # at each row's [CLS]
    # The import takes the masked LM and says what it left out.
    back = read_hf(str(tmp_path / "hf"))
    assert "pooler" not in back.params and back.source["left_out"] == [
        "bert.pooler.dense.bias", "bert.pooler.dense.weight", "cls.seq_relationship.bias",
        "cls.seq_relationship.weight"]


def _hf_bert(path, texts):
    """A randomly initialized transformers ``BertForPreTraining`` (every parameter
    perturbed) with a WordPiece tokenizer trained here, saved as safetensors."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tokenizer = transformers.BertTokenizer(tokenizer_object=wordpiece)
    config = transformers.BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     hidden_act="gelu_new", initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def test_a_transformers_bert_imports_with_its_wordpiece_tokenizer_and_predicts_as_transformers(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from t2x.export import read_export

    texts = held_out(200)
    hf, hf_tokenizer = _hf_bert(tmp_path / "bert", texts)
    code = main(["import-hf", str(tmp_path / "bert"), "--output", str(tmp_path / "export")])
    manifest = json.loads(capsys.readouterr().out)
    assert code == 0 and manifest["source"]["architecture"] == "BertForPreTraining"
    assert manifest["source"]["left_out"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                              "cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    exported = read_export(str(tmp_path / "export"))
    m = exported.cfg.model
    assert (m.family, m.mlp, m.norm_position, m.embed_norm, m.type_vocab_size) == ("encoder", "gelu", "post", True, 2)
    tokens, real, types = batch(m)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(real),
                      token_type_ids=torch.tensor(types, dtype=torch.long)).prediction_logits.numpy()
    assert_close_where_real(ours(exported.cfg, exported.params, tokens, real, types), expected, real)
    # Its rows are [CLS] text [SEP], as the WordPiece tokenizer frames them; [MASK] masks.
    tokenizer = load_tokenizer(str(tmp_path / "export"))
    framed = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode(texts[:20])]
    assert framed == [hf_tokenizer(t)["input_ids"] for t in texts[:20]]
    assert masking_tokens(tokenizer, m.vocab_size).mask == hf_tokenizer.mask_token_id
    # A BertModel (no masked-LM head; LayerNorm parameters named gamma and beta, as
    # checkpoints converted from TensorFlow have them) is refused by import-hf and read
    # as an encoder alone: the same parameters, less the head.
    hf.bert.save_pretrained(tmp_path / "encoder")
    hf_tokenizer.save_pretrained(tmp_path / "encoder")
    weights = tmp_path / "encoder" / "model.safetensors"
    save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    code = main(["import-hf", str(tmp_path / "encoder"), "--output", str(tmp_path / "no-head")])
    assert code == 1 and "without the masked-LM head" in capsys.readouterr().err
    assert not (tmp_path / "no-head").exists()
    encoder_only = read_hf(str(tmp_path / "encoder"), encoder_only=True)
    assert encoder_only.source["left_out"] == ["pooler.dense.bias", "pooler.dense.weight"]
    full = {k: v for k, v in exported.params.items() if not k.startswith("mlm_")}
    assert jax.tree.structure(full) == jax.tree.structure(encoder_only.params)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(encoder_only.params)):
        assert np.array_equal(a, b)


def test_encoders_bert_cannot_represent_are_refused_and_nothing_is_written(tmp_path):
    cfg, params = encoder()
    files = load_tokenizer(cfg.data.tokenizer).files
    for overrides, option in [
        (["model.norm_position=pre"], "model.norm_position=pre"),
        (["model.position=rope"], "model.position=rope"),
        (["model.norm=rmsnorm"], "model.norm=rmsnorm"),
        (["model.mlp=swiglu"], "model.mlp=swiglu"),
        (["model.use_bias=false"], "model.use_bias=false"),
        (["model.embed_norm=false"], "model.embed_norm=false"),
        (["model.num_kv_heads=2"], "model.num_kv_heads=2"),
    ]:
        bad = tiny_config("/nonexistent", *ENCODER, *overrides)
        with pytest.raises(ExportError, match=option):
            architecture(bad.model)
        out = tmp_path / overrides[0]
        with pytest.raises(ExportError, match=option):
            write_hf(str(out), Exported(bad, params, files, {"kind": "test", "path": "bad"}))
        assert not out.exists() and not list(tmp_path.glob(".*"))
