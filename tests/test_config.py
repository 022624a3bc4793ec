"""Config loading, overrides and the errors bad configs get."""

import json
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from t2x.config import Config, ConfigError, MeshConfig, load_config, to_yaml
from t2x.models import build_model
from t2x.parallel import resolve_axis_sizes
from t2x.models import abstract_params, count_params

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_directory_has_the_required_shapes():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize(
    "name, layers, d_model, heads, d_ff, exact_params",
    # Parameter counts of the published GPT-2 checkpoints (vocabulary 50257).
    [("gpt2_small", 12, 768, 12, 3072, 124_439_808), ("gpt2_medium", 24, 1024, 16, 4096, 354_823_168),
     ("gpt2_large", 36, 1280, 20, 5120, 774_030_080), ("gpt2_xl", 48, 1600, 25, 6400, 1_557_611_200)],
)
def test_gpt2_configs_build_the_published_models(name, layers, d_model, heads, d_ff, exact_params):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["model.vocab_size=50257"])
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_heads, m.d_ff, m.max_seq_len) == (layers, d_model, heads, d_ff, 1024)
    params, _ = abstract_params(build_model(m), seq_len=8)
    assert count_params(params) == exact_params


def test_overrides_apply_and_are_typed():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.num_layers=3", "optim.lr=1e-3", "data.train_files=[a,b]"])
    assert cfg.model.num_layers == 3 and cfg.optim.lr == 1e-3
    assert cfg.data.train_files == ("a", "b")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.steps=7"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["model.num_layer=3"], "model.num_layer"),
        (["optimizer.lr=1"], "optimizer"),
        (["model.num_layers=three"], "model.num_layers"),
        (["model.position=alibi"], "model.position"),
        (["train.global_batch_size=12", "data.num_shards=8"], "data.num_shards"),
        (["train.global_batch_size=16", "train.grad_accum_steps=3"], "train.grad_accum_steps"),
        (["model.position=learned", "data.seq_len=256", "model.max_seq_len=128"], "model.max_seq_len"),
        (["model.num_heads=4", "model.num_kv_heads=3"], "model.num_kv_heads"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh"),
        (["model.dropout=1.5"], "model.dropout"),
        (["model.attention=cudnn", "model.dtype=float32"], "model.dtype=bfloat16"),
        (["no_equals_sign"], "key=value"),
        (["train.loss_chunk_len=-8"], "train.loss_chunk_len"),
        (["objective.max_predictions=-1"], "objective.max_predictions"),
        (["model.scan_unroll=0"], "model.scan_unroll"),
        (["classify.labels=[yes,no]", "data.format=csv", "train.sample_tokens=0", "train.loss_chunk_len=8"], "train.loss_chunk_len=0"),
    ],
)
def test_bad_config_fails_at_load_naming_the_key(overrides, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 2\n  hidden: 3\n")
    with pytest.raises(ConfigError, match=r"model\.hidden"):
        load_config(path)


def test_mesh_sizes_resolve_and_must_fit_the_devices():
    assert resolve_axis_sizes(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert resolve_axis_sizes(MeshConfig(data=1, fsdp=8, tensor=1), 8)["fsdp"] == 8
    with pytest.raises(ConfigError, match="8 are available"):
        resolve_axis_sizes(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_axis_sizes(MeshConfig(data=-1, fsdp=3, tensor=1), 8)


@pytest.mark.parametrize("value, mode", [("off", "off"), ("on", "on"), ("auto", "auto"), ("'off'", "off")])
def test_distributed_mode_reads_as_documented_in_overrides_and_yaml(value, mode, tmp_path):
    assert load_config(None, [f"distributed.mode={value}"]).distributed.mode == mode
    path = tmp_path / "c.yaml"
    path.write_text(f"distributed:\n  mode: {value}\n")
    cfg = load_config(path)
    assert cfg.distributed.mode == mode
    (tmp_path / "again.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "again.yaml").distributed.mode == mode


def test_launch_settings_are_not_part_of_a_run(tmp_path):
    from t2x.rundir import load_run, write_run_files

    launched = load_config(REPO / "configs" / "tiny.yaml", [
        "distributed.coordinator_address=10.0.0.1:1234", "distributed.num_processes=4", "distributed.process_id=2",
        f"train.run_dir={tmp_path}"])
    write_run_files(str(tmp_path), launched, {"tokenizer.model": b"model"})
    assert "10.0.0.1" not in (tmp_path / "config.yaml").read_text()
    cfg, _ = load_run(str(tmp_path), [])
    assert cfg.distributed == load_config().distributed
    # An older run directory that recorded them does not pass them on either.
    (tmp_path / "config.yaml").write_text(to_yaml(launched))
    assert load_run(str(tmp_path), [])[0].distributed.num_processes is None
    assert load_run(str(tmp_path), ["distributed.mode=off"])[0].distributed.mode == "off"


FUZZ_EXAMPLES = int(os.environ.get("T2X_FUZZ_EXAMPLES", "120"))  # reliability/run.py asks for thousands
KEYS = ["model.num_layers", "model.d_model", "model.position", "model.dropout", "data.seq_len", "data.num_shards",
        "data.train_files", "mesh.data", "optim.lr", "optim.clip_norm", "train.steps", "train.global_batch_size",
        "checkpoint.keep", "distributed.mode", "eval.max_batches", "nonsense", "model", "model.nope.deeper"]
VALUES = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True), st.booleans(), st.none(),
                   st.text(max_size=12), st.lists(st.text(max_size=5), max_size=3))


def _override_value(value) -> str:
    return json.dumps(value) if not isinstance(value, float) or value == value else ".nan"


def _nested(pairs) -> dict:
    tree: dict = {}
    for key, value in pairs:
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {}) if isinstance(node.get(name, {}), dict) else {}
        node[leaf] = value
    return tree


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4), as_yaml=st.booleans())
def test_any_config_loads_or_fails_naming_a_key(pairs, as_yaml, tmp_path_factory):
    """Random and malformed values give a valid config or a ConfigError, never a library traceback."""
    if as_yaml:
        path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
        path.write_text(yaml.safe_dump(_nested(pairs)))
        args = (path, [])
    else:
        args = (None, [f"{k}={_override_value(v)}" for k, v in pairs])
    try:
        cfg = load_config(*args)
    except ConfigError as e:
        assert str(e)
        return
    assert isinstance(cfg, Config)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(text=st.text(max_size=200))
def test_any_yaml_text_loads_or_fails_naming_the_file(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e)
