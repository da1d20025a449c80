"""config.logging (W&B): the keys are checked with one line each (wandb missing, a key
without the project); a W&B run that cannot start is one line naming the key; a write
that fails once drops W&B and never the run; a rerun continues the workdir's W&B run
after the steps it has."""

import glob
import sys

import pytest
from conftest import tiny_config

from llmjax.config import validate
from llmjax.training import wandb_writer


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, quiet, its files under tmp_path, nothing sent anywhere."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true",
                        "WANDB_DISABLE_CODE": "true", "WANDB_X_DISABLE_STATS": "true",
                        "WANDB_X_DISABLE_MACHINE_INFO": "true",
                        "WANDB_DIR": str(tmp_path / "wandb_dir")}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "wandb_dir").mkdir()
    return pytest.importorskip("wandb")


def test_the_project_without_wandb_installed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees without it
    validate(tiny_config())  # the key empty: W&B is not needed
    with pytest.raises(ValueError) as e:
        validate(tiny_config(**{"logging.wandb_project": "llmjax"}))
    message = str(e.value)
    assert "config.logging.wandb_project" in message and 'pip install -e ".[wandb]"' in message
    assert "\n" not in message


@pytest.mark.parametrize("key", ["wandb_entity", "wandb_run_name", "wandb_tags"])
def test_a_wandb_key_without_the_project_names_both(key):
    with pytest.raises(ValueError, match=rf"config.logging.{key} is set but "
                                         r"config.logging.wandb_project is empty"):
        validate(tiny_config(**{f"logging.{key}": "x"}))


def test_a_run_wandb_cannot_start_is_one_line_naming_the_key(tmp_path, offline_wandb,
                                                            monkeypatch):
    def refuse(**kwargs):
        raise offline_wandb.errors.UsageError("api_key not configured\n(no-tty)")

    monkeypatch.setattr(offline_wandb, "init", refuse)
    config = tiny_config(**{"logging.wandb_project": "llmjax"})
    with pytest.raises(ValueError) as e:
        wandb_writer.start(config, str(tmp_path))
    assert str(e.value) == (
        "W&B could not start a run for config.logging.wandb_project='llmjax': api_key not "
        "configured (no-tty); run `wandb login`, set WANDB_MODE=offline (sync later), or "
        "leave the key empty")


class FakeRun:
    starting_step = 0

    def __init__(self, error=None):
        self.error, self.calls = error, []

    def log(self, values, step):
        self.calls.append(step)
        if self.error:
            raise self.error

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))


def test_a_failing_write_warns_once_and_drops_wandb(caplog):
    run = FakeRun(ConnectionError("the W&B service went away"))
    writer = wandb_writer.WandbWriter(run)
    writer.write_scalars(1, {"train/loss": 2.0})
    writer.write_scalars(2, {"train/loss": 1.0})
    writer.write_texts(2, {"sample": "text"})
    writer.close()
    assert run.calls == [1]  # neither the later steps nor finish reach the broken run
    warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert warnings == ["W&B log failed (ConnectionError: the W&B service went away); the run "
                        "goes on, logging to metrics.jsonl and TensorBoard only"]


def test_a_run_that_an_error_ends_is_finished_as_failed():
    finished, failed = FakeRun(), FakeRun()
    wandb_writer.WandbWriter(finished).close()
    try:
        raise ValueError("config.nan_policy=stop: a non-finite loss")
    except ValueError:
        wandb_writer.WandbWriter(failed).close()
    assert finished.calls == [("finish", None)] and failed.calls == [("finish", 1)]


def test_a_rerun_in_the_workdir_continues_its_wandb_run(tmp_path, offline_wandb):
    config = tiny_config(**{"logging.wandb_project": "llmjax",
                            "logging.wandb_run_name": "tiny"})
    workdir = tmp_path / "run"
    workdir.mkdir()
    run_ids = []
    for steps in ([1, 2], [3]):
        writer = wandb_writer.start(config, str(workdir))
        run = writer._run
        run_ids.append(run.id)
        assert run.name == "tiny" and run.config["num_train_steps"] == 8
        for step in steps:
            writer.write_scalars(step, {"train/loss": 1.0 / step})
        writer.write_texts(steps[-1], {"sample": f"ROMEO: {steps[-1]}"})
        assert run.summary["sample"] == f"ROMEO: {steps[-1]}"
        writer.close()
    assert run_ids[0] == run_ids[1] == (workdir / "wandb_run_id").read_text().strip()
    # $WANDB_DIR decides where W&B's files go (even once W&B has started in the process)
    assert not (workdir / "wandb").exists() and not glob.glob(f"wandb/*{run_ids[0]}*")
    assert len(list((tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_ids[0]}"))) == 2


def test_steps_before_the_resumed_wandb_run_continues_are_left_to_it():
    run = FakeRun()
    run.starting_step = 6  # W&B had steps up to 5: a killed run logged past its checkpoint
    writer = wandb_writer.WandbWriter(run)
    for step in (4, 5, 6, 7):
        writer.write_scalars(step, {"train/loss": 1.0})
    assert run.calls == [6, 7]
