"""The config schema: every bad key or value is one ValueError naming it; the run-directory
contract reads model paths the way the commands do."""

import pytest
from conftest import tiny_config

from llmjax import workdir
from llmjax.config import base_config, check_task, validate, with_overrides
from llmjax.models import model_config


def test_base_config_and_the_tiny_config_are_valid():
    validate(base_config())
    validate(tiny_config())


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.shedule", "cosine", r"config\.optimizer\.shedule is not a known key"),
    ("optimizer.schedule", "cosin", r"config\.optimizer\.schedule='cosin': choose one of"),
    ("optimizer.name", "lion", r"config\.optimizer\.name='lion'"),
    ("num_train_steps", 0, r"config\.num_train_steps=0 must be a positive integer"),
    ("grad_accum_steps", 3, r"global_batch_size=8 is not divisible by .*grad_accum_steps=3"),
    ("task", "regress", r"config\.task='regress'"),
    ("mesh.rules", "zero3", r"config\.mesh\.rules='zero3': choose one of"),
    ("data.packing", "greedy", r"config\.data\.packing='greedy'"),
    ("data.eval_fraction", 1.5, r"config\.data\.eval_fraction=1\.5"),
    ("lora.rank", -1, r"config\.lora\.rank=-1"),
    ("early_stopping.patience", 2, r"early_stopping\.metric"),
    ("model.num_kv_heads", 3, r"config\.model\.num_heads=4 must be a multiple of"),
    ("model.hidden", 3, r"config\.model\.hidden is not a llama setting"),
    ("model.remat_policy", "most", r"config\.model\.remat_policy='most'"),
])
def test_each_bad_value_names_its_key(key, value, message):
    config = tiny_config()
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=message) as raised:
        validate(config)
    assert "\n" not in str(raised.value)


def test_the_task_must_fit_the_model():
    bert = model_config(dict(family="bert", vocab_size=10, embed_dim=8, num_layers=1,
                             num_heads=2, mlp_dim=8))
    with pytest.raises(ValueError, match="family='bert' .*is a classifier: set config.task"):
        check_task("lm", bert)
    check_task("classify", bert)
    llama = model_config(dict(tiny_config().model, vocab_size=10))
    with pytest.raises(ValueError, match="config.task=classify needs config.model.num_labels"):
        check_task("classify", llama)


@pytest.mark.parametrize("path, expected", [
    ("runs/a", ("runs/a", "checkpoints", None)),
    ("runs/a/", ("runs/a", "checkpoints", None)),
    ("runs/a/checkpoints/40", ("runs/a", "checkpoints", 40)),
    ("runs/a/best/12", ("runs/a", "best", 12)),
    ("gs://bucket/runs/a/checkpoints/7", ("gs://bucket/runs/a", "checkpoints", 7)),
])
def test_model_paths_name_a_workdir_and_maybe_a_step(path, expected):
    assert workdir.split_checkpoint(path) == expected


def test_a_workdir_config_that_is_missing_or_not_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json not found"):
        workdir.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json is not valid JSON"):
        workdir.read_config(str(tmp_path))
    assert not workdir.is_hf_dir(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert workdir.is_hf_dir(str(tmp_path))


def test_with_overrides_sets_dotted_keys_on_a_copy():
    config = base_config()
    changed = with_overrides(config, {"grad_accum_steps": 4, "model.remat_policy": "full"})
    assert (changed.grad_accum_steps, changed.model.remat_policy) == (4, "full")
    assert (config.grad_accum_steps, config.model.remat_policy) == (1, "none")  # untouched
