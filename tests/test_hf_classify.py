"""Hugging Face format for fine-tuned classifiers: export as ``BertForSequenceClassification``,
``GPT2ForSequenceClassification`` or ``LlamaForSequenceClassification`` and import back,
checked against ``transformers`` with the same weights; classifiers transformers has no
class for refused, naming the setting."""

import functools
import json
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from t2x.cli import main
from t2x.config import to_yaml
from t2x.data.tokenizer import HF_CONFIG_FILE, HF_FILE, from_files, load_tokenizer
from t2x.export import Exported, ExportError, export_run, relayout
from t2x.hf import architecture, read_hf, write_hf
from t2x.hf.tokenizer import PAD_TOKEN, tokenizer_files
from t2x.infer.model import load, place
from t2x.infer.score import Scorer
from t2x.models import abstract_params
from t2x.models.classifier import Classifier
from test_hf import assert_close, held_out
from test_hf_bert import ENCODER
from test_infer import VARIANTS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LABELS = ["tkinter", "asyncio", "email"]
CLASSIFY = [f"classify.labels=[{','.join(LABELS)}]", "classify.label_key=label"]
MODELS = {
    "bert": [*ENCODER, "classify.pooling=cls"],
    "gpt2": ["classify.pooling=last"],  # biases everywhere but in the head (score has none)
    "llama": [*VARIANTS["llama_unscanned"], "classify.pooling=last"],
}
CLASSES = {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
           "llama": "LlamaForSequenceClassification"}
LENGTHS = (32, 20, 9, 3)  # real tokens of each row of the test batch; the rest is padding


def classifier(variant, *overrides):
    """A tiny classifier config and random parameters of its shapes: biases random too,
    norm scales around 1."""
    cfg = tiny_config("/nonexistent", "model.init_std=0.3", *MODELS[variant], *CLASSIFY, *overrides)
    pooling = "cls" if variant == "bert" else "last"
    shapes, _ = abstract_params(Classifier(cfg.model, len(LABELS), pooling), 8)
    rng = np.random.default_rng(3)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return 1 + 0.2 * noise if path[-1].key == "scale" else 0.3 * noise

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    assert variant == "bert" or "bias" not in params["classifier"]  # a decoder's head has none
    return cfg, params


def export(variant, path, *overrides):
    cfg, params = classifier(variant, *overrides)
    files = load_tokenizer(cfg.data.tokenizer).files
    config = write_hf(str(path), Exported(cfg, params, files, {"kind": "test", "path": variant}))
    return cfg, params, config


def batch(tokenizer):
    """Rows as t2x's classifier reads them, BOS text EOS then 0s, [rows, 32]; the text is
    random ids, the pad token's among them; and the real-token masks."""
    rng = np.random.default_rng(0)
    tokens = np.zeros((len(LENGTHS), 32), np.int32)
    for row, n in enumerate(LENGTHS):
        text = rng.integers(0, tokenizer.vocab_size, n - 2)
        text[rng.integers(0, max(n - 2, 1))] = 0  # t2x's pad id inside the text
        tokens[row, :n] = [tokenizer.bos_id, *text[: n - 2], tokenizer.eos_id]
    return tokens, (np.arange(32) < np.array(LENGTHS)[:, None]).astype(np.int32)


@functools.cache
def _apply(m, pooling):
    module = Classifier(m, len(LABELS), pooling)
    return jax.jit(lambda params, tokens, real: module.apply({"params": params}, tokens, None, real)[:, 0])


def ours(cfg, params, tokens, real):
    """t2x's class logits [rows, labels] of the batch."""
    return np.asarray(_apply(cfg.model, cfg.classify.pooling)(params, tokens, real))


def theirs(model, tokens, real, pad_id):
    """transformers' class logits of the same rows, padded with its ``pad_id``."""
    ids = np.where(real > 0, tokens, pad_id)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(real)).logits.numpy()


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_a_classifier_exports_as_sequence_classification_with_our_logits_and_imports_back(variant, tmp_path):
    cfg, params, config = export(variant, tmp_path / "hf")
    assert config["architectures"] == [CLASSES[variant]] == [architecture(cfg.model, cfg.classify)]
    assert config["id2label"] == {"0": "tkinter", "1": "asyncio", "2": "email"}
    assert config["label2id"] == {"tkinter": 0, "asyncio": 1, "email": 2}
    assert config["problem_type"] == "single_label_classification"
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == CLASSES[variant] and hf.config.id2label == dict(enumerate(LABELS))
    pad = hf.config.pad_token_id
    if variant != "bert":  # the last non-pad token must be EOS, as t2x's pools
        assert pad is not None and pad != tokenizer.eos_id
    tokens, real = batch(tokenizer)
    expected = ours(cfg, params, tokens, real)
    assert_close(expected, theirs(hf, tokens, real, pad if pad is not None else 0))
    assert np.ptp(expected) > 0.1  # logits that tell labels apart: a dropped tensor would show
    # Importing the export gives back the classifier: its labels, pooling and parameters.
    back = read_hf(str(tmp_path / "hf"))
    assert back.cfg.classify.labels == tuple(LABELS) and back.source["architecture"] == CLASSES[variant]
    assert back.cfg.classify.pooling == ("cls" if variant == "bert" else "last")
    assert back.cfg.model.family == cfg.model.family and back.cfg.model.use_bias == cfg.model.use_bias
    want = {**params, "backbone": relayout(params["backbone"], back.cfg.model)}
    assert jax.tree.structure(want) == jax.tree.structure(back.params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(back.params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("variant", ["bert", "llama"])
def test_texts_the_exported_tokenizer_pads_classify_as_t2x_serves_them(variant, tmp_path):
    cfg, params, _ = export(variant, tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    texts = held_out(12)
    encoded = hf_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    # Rows framed as t2x's: BOS text EOS, cut to the context, padded on the right.
    rows = [[tokenizer.bos_id, *ids[: cfg.model.max_seq_len - 2], tokenizer.eos_id] for ids in tokenizer.encode(texts)]
    assert [ids[: int(n)] for ids, n in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].sum(1))] == rows
    assert hf_tokenizer.padding_side == "right" and hf_tokenizer.pad_token_id == hf.config.pad_token_id
    with torch.no_grad():
        probabilities = torch.softmax(hf(**encoded).logits, -1).numpy()
    served = Scorer(place(Exported(cfg, params, tokenizer.files, {"kind": "test", "path": variant})),
                    batch_size=4).classify(texts)
    assert_close(np.array([[c["probabilities"][label] for label in LABELS] for c in served]), probabilities)


def test_a_transformers_llama_classifier_imports_and_classifies_as_transformers(tmp_path, capsys):
    """A LlamaForSequenceClassification made and saved by transformers (every parameter
    perturbed), imported with t2x import-hf: t2x serves its labels and probabilities."""
    export("llama", tmp_path / "ours")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "theirs")
    for name in (HF_FILE, HF_CONFIG_FILE):
        shutil.copy(tmp_path / "ours" / name, tmp_path / "theirs" / name)
    code = main(["import-hf", str(tmp_path / "theirs"), "--output", str(tmp_path / "export")])
    manifest = json.loads(capsys.readouterr().out)
    assert code == 0 and manifest["source"]["architecture"] == "LlamaForSequenceClassification"
    model = load(str(tmp_path / "export"))
    assert model.classifies and model.cfg.classify.labels == tuple(LABELS)
    texts = held_out(6)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        probabilities = torch.softmax(hf(**hf_tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
                                      .logits, -1).numpy()
    served = Scorer(model, batch_size=8).classify(texts)
    assert_close(np.array([[c["probabilities"][label] for label in LABELS] for c in served]), probabilities)
    assert [c["label"] for c in served] == [LABELS[i] for i in probabilities.argmax(-1)]


def test_classifiers_transformers_has_no_class_for_are_refused_naming_the_setting(tmp_path):
    for variant, overrides, option in [
        ("bert", ["classify.pooling=mean"], "classify.pooling=mean"),
        ("bert", ["classify.pooling=last"], "classify.pooling=last"),
        ("llama", ["classify.pooling=mean"], "classify.pooling=mean"),
        ("bert", ["model.norm_position=pre"], "model.norm_position=pre"),  # the backbone's own refusals hold
    ]:
        cfg = tiny_config("/nonexistent", *MODELS[variant], *CLASSIFY, *overrides)
        with pytest.raises(ExportError, match=option):
            architecture(cfg.model, cfg.classify)
    # An encoder-decoder's classifier pools its encoder alone (the mean, by default).
    t5 = tiny_config("/nonexistent", "model.family=encoder_decoder", "model.position=relative", "model.norm=rmsnorm",
                     "model.use_bias=false", "model.mlp=relu", *CLASSIFY)
    with pytest.raises(ExportError, match="classify.pooling=mean.*T5ForSequenceClassification"):
        architecture(t5.model, t5.classify)
    # A GPT-2 head with a bias: score has none.
    cfg, params = classifier("gpt2")
    params["classifier"]["bias"] = np.full(len(LABELS), 0.5, np.float32)
    files = load_tokenizer(cfg.data.tokenizer).files
    with pytest.raises(ExportError, match="model.use_bias=true.*score layer has none"):
        write_hf(str(tmp_path / "biased"), Exported(cfg, params, files, {"kind": "test", "path": "biased"}))
    assert not (tmp_path / "biased").exists() and not list(tmp_path.glob(".*"))
    # t2x export refuses a run's classifier before reading its checkpoint (it has none here).
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(tiny_config(str(run), *MODELS["bert"], *CLASSIFY,
                                                         "classify.pooling=mean")))
    with pytest.raises(ExportError, match="classify.pooling=mean"):
        export_run(str(run), str(tmp_path / "out"), fmt="hf")
    assert not (tmp_path / "out").exists()


def test_imports_of_other_classification_problems_are_refused(tmp_path):
    export("bert", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    original = json.loads(path.read_text())
    for change, key in [({"problem_type": "multi_label_classification"}, "problem_type"),
                        ({"problem_type": "regression", "id2label": {"0": "score"}}, "problem_type"),
                        ({"id2label": {"0": "score"}, "label2id": {"score": 0}}, "id2label"),
                        ({"id2label": {"0": "a", "2": "b"}}, "id2label")]:
        path.write_text(json.dumps(original | change))
        with pytest.raises(ExportError, match=f"config.json {key}="):
            read_hf(str(tmp_path / "hf"))


def test_a_decoder_classifier_pads_with_a_token_other_than_eos():
    """BOS (or an added <pad> past the vocabulary) when the tokenizer's pad token is EOS
    or it has none; refused when the model's vocabulary has no room for one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(held_out(100), trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    eos_only = {HF_FILE: bpe.to_str().encode(), HF_CONFIG_FILE: json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}).encode()}
    tokenizer = from_files(eos_only, "gpt2-like")
    assert tokenizer.bos_id == tokenizer.eos_id == 0
    room = tiny_config("/nonexistent", f"model.vocab_size={tokenizer.vocab_size + 1}").model
    files, ids = tokenizer_files(eos_only, tokenizer, room, classifier=True)
    assert ids["pad_token"] == tokenizer.vocab_size and json.loads(files[HF_CONFIG_FILE])["pad_token"] == PAD_TOKEN
    full = tiny_config("/nonexistent", f"model.vocab_size={tokenizer.vocab_size}").model
    with pytest.raises(ExportError, match=f"model.vocab_size={tokenizer.vocab_size} leaves no id"):
        tokenizer_files(eos_only, tokenizer, full, classifier=True)
    # With a BOS of its own, that pads.
    own = load_tokenizer("builtin:512")
    sp_files = {HF_FILE: tokenizer_files(own.files, own)[0][HF_FILE],
                HF_CONFIG_FILE: json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}).encode()}
    _, ids = tokenizer_files(sp_files, from_files(sp_files, "sp"), tiny_config("/nonexistent").model, classifier=True)
    assert ids["pad_token"] == own.bos_id != own.eos_id
