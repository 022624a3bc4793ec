"""Hugging Face format: export to ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` and import
back, checked against ``transformers`` (CPU build of torch) with the same weights;
``tokenizer.json`` tokenizers; and training that starts from an export."""

import json

import jax
import numpy as np
import pytest
import sentencepiece as spm

from conftest import restored, tiny_config
from t2x.cli import main
from t2x.data import corpus
from t2x.data.sources import read_texts
from t2x.config import load_config
from t2x.data.tokenizer import load_tokenizer
from t2x.export import Exported, ExportError, read_export, relayout
from t2x.hf import architecture, read_hf, write_hf
from t2x.infer.model import load
from t2x.train.loop import train
from test_infer import VARIANTS, forward, random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_VARIANTS = {
    **VARIANTS,  # GPT-2 (tied, biases) and Llama (unscanned, grouped-query, untied, no biases)
    "llama_biased_tied": ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.num_kv_heads=2"],
}


def held_out(n: int) -> list[str]:
    return list(read_texts([corpus.split_file("validation")]))[:n]


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def assert_close(ours, theirs):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(tiny_config(path))
    return path


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_the_hf_export_gives_transformers_our_logits_and_tokens(variant, tmp_path):
    model = random_model(variant, settings=HF_VARIANTS[variant])
    params = jax.device_get(model.params)
    out = tmp_path / "hf"
    write_hf(str(out), Exported(model.cfg, params, model.tokenizer.files, {"kind": "test", "path": variant}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == architecture(model.cfg.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = held_out(40)
    ids = [model.tokenizer.bos_id, *model.tokenizer.encode([texts[0]])[0]][: model.context]
    assert_close(forward(model, ids), hf_logits(hf, ids))
    # The same ids for the same texts, BOS first; where a segmentation differs, both are
    # of equal score (a tie SentencePiece and tokenizers break differently).
    sp = spm.SentencePieceProcessor(model_proto=model.tokenizer.files["tokenizer.model"])
    score = lambda ids: sum(sp.get_score(i) for i in ids)  # noqa: E731
    ties = 0
    for text, ours in zip(texts, model.tokenizer.encode(texts)):
        theirs = tokenizer(text)["input_ids"]
        assert theirs[0] == model.tokenizer.bos_id and tokenizer.decode(theirs[1:]) == text
        if theirs[1:] != ours:
            ties += 1
            assert score(theirs[1:]) == pytest.approx(score(ours), abs=1e-4), text
    assert ties <= 2
    # Importing the export gives back the same parameters, bit for bit.
    back = read_hf(str(out))
    expected = relayout(params, back.cfg.model)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(back.params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_configs_neither_architecture_represents_are_refused():
    for overrides, option in [
        (["model.position=rope"], "model.norm=layernorm"),
        (["model.norm=rmsnorm"], "model.norm=rmsnorm"),
        (["model.num_kv_heads=2"], "model.num_kv_heads=2"),
        (["model.head_dim=16"], "model.head_dim=16"),
        (["model.position=rope", "model.norm=rmsnorm"], "model.mlp=gelu"),
    ]:
        with pytest.raises(ExportError, match=option):
            architecture(tiny_config("/nonexistent", *overrides).model)


def _hf_gpt2(path, vocab_texts):
    """A randomly initialized transformers GPT-2 with a byte-level BPE tokenizer trained
    here, saved as safetensors."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(vocab_texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def test_a_transformers_gpt2_imports_and_scores_as_transformers_does(tmp_path, capsys):
    texts = held_out(200)
    hf, hf_tokenizer = _hf_gpt2(tmp_path / "gpt2", texts)
    code = main(["import-hf", str(tmp_path / "gpt2"), "--output", str(tmp_path / "export")])
    manifest = json.loads(capsys.readouterr().out)
    assert code == 0 and manifest["source"]["architecture"] == "GPT2LMHeadModel"
    assert set(manifest["files"]) >= {"tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    model = load(str(tmp_path / "export"))
    # Weights sharded over several safetensors files (model.safetensors.index.json) read the same.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    hf_tokenizer.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for a, b in zip(jax.tree.leaves(read_hf(str(tmp_path / "sharded")).params), jax.tree.leaves(model.params)):
        assert np.array_equal(a, b)
    assert model.tokenizer.encode(texts[:20]) == [hf_tokenizer(t)["input_ids"] for t in texts[:20]]
    ids = [model.tokenizer.bos_id, *model.tokenizer.encode([texts[1]])[0]][:40]
    assert_close(forward(model, ids), hf_logits(hf, ids))
    # t2x score: the log-likelihood transformers gives the same tokens.
    file = tmp_path / "texts.jsonl"
    file.write_text(json.dumps({"text": texts[1][:60]}) + "\n")
    assert main(["score", str(tmp_path / "export"), str(file)]) == 0
    scored = json.loads(capsys.readouterr().out)["texts"][0]
    ids = [0, *hf_tokenizer(texts[1][:60])["input_ids"]]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    expected = float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1)))
    assert scored["tokens"] == len(ids) - 1 and scored["log_likelihood"] == pytest.approx(expected, rel=1e-5)
    # t2x eval of the imported model on a text file, bits per byte included.
    code = main(["eval", str(tmp_path / "export"), "--text", str(file), "eval.global_batch_size=8", "data.seq_len=64"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["bytes"] == len(texts[1][:60].encode()) and 0 < result["bits_per_byte"] < 20
    # Pretraining continues from it, tokenizing with its tokenizer.json.
    export = tmp_path / "export"
    cfg = load_config(export / "config.yaml", [
        f"train.run_dir={tmp_path / 'continued'}", f"train.init_from={export}", f"data.tokenizer={export}",
        "train.steps=2", "train.global_batch_size=8", "data.seq_len=32", "data.block_docs=16", "eval.max_batches=1",
        "train.progress_bar=false", "train.log_every=1"])
    result = train(cfg)
    assert result["step"] == 2 and np.isfinite(result["loss"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line) and json.loads(line)["split"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_imports_that_t2x_cannot_reproduce_are_refused(tmp_path, capsys):
    _hf_gpt2(tmp_path / "gpt2", held_out(50))

    def variant(name, change):
        d = tmp_path / name
        d.mkdir()
        for f in (tmp_path / "gpt2").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        change(d)
        return d

    def set_config(key, value):
        def change(d):
            config = json.loads((d / "config.json").read_text())
            config[key] = value
            (d / "config.json").write_text(json.dumps(config))
        return change

    def pickled(d):
        (d / "model.safetensors").rename(d / "pytorch_model.bin")

    def extra_tensor(d):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(d / "model.safetensors")
        save_file({**tensors, "transformer.h.0.adapter.weight": np.zeros(3, np.float32)}, d / "model.safetensors",
                  metadata={"format": "pt"})

    for name, change, message in [
        ("erf", set_config("activation_function", "gelu"), "activation_function='gelu'"),
        ("bert", set_config("architectures", ["BertForMaskedLM"]), "BertForMaskedLM"),
        ("pickle", pickled, "reads no pickled weights"),
        ("extra", extra_tensor, "transformer.h.0.adapter.weight"),
        ("shape", set_config("n_inner", 96), "mlp.c_fc.weight has shape"),
    ]:
        code = main(["import-hf", str(variant(name, change)), "--output", str(tmp_path / f"out-{name}")])
        err = capsys.readouterr().err
        assert code == 1 and message in err, (name, err)
        assert not (tmp_path / f"out-{name}").exists()


def test_train_export_to_transformers_same_greedy_text_import_and_continue(run, tmp_path, capsys):
    def cli(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    hf_dir, export, back = tmp_path / "hf", tmp_path / "export", tmp_path / "imported"
    cli("export", run, "--output", hf_dir, "--format", "hf")
    cli("export", run, "--output", export)
    prompts = ["Return the", "The module"]
    ours = cli("generate", export, *[a for p in prompts for a in ("--prompt", p)], "--max-new-tokens", 8)["completions"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for prompt, completion in zip(prompts, ours):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tokenizer.eos_token_id]
        assert new == completion["tokens"]
        assert tokenizer.decode(new, skip_special_tokens=True) == completion["text"]
    # Imported back, the parameters are those of the t2x export, bit for bit.
    cli("import-hf", hf_dir, "--output", back)
    original, imported = read_export(str(export)), read_export(str(back))
    for a, b in zip(jax.tree.leaves(original.params), jax.tree.leaves(imported.params)):
        assert np.array_equal(a, b)
    # A new run starts from the export (its tokenizer too) instead of a random init.
    cfg = tiny_config(tmp_path / "continued", f"train.init_from={export}", f"data.tokenizer={export}",
                      "train.steps=1", "optim.lr=1e-12", "optim.warmup_steps=0")
    train(cfg)
    state, _ = restored(tmp_path / "continued", f"data.tokenizer={export}")
    for a, b in zip(jax.tree.leaves(original.params), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(b, a, atol=1e-9)
    for i, (overrides, message) in enumerate([
        ([f"data.tokenizer={export}", "model.num_layers=3"], "has model.num_layers=2, this run model.num_layers=3"),
        ([f"data.tokenizer={back}"], "another tokenizer"),  # the same pieces, as a tokenizer.json
    ]):
        with pytest.raises(ExportError, match=message):
            train(tiny_config(tmp_path / f"bad{i}", f"train.init_from={export}", "train.steps=1", *overrides))
    assert load_tokenizer(str(back)).encode(held_out(5)) == load_tokenizer(str(export)).encode(held_out(5))
