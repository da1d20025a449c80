"""Every command follows one convention: absl flags with underscores that --help lists,
--config.KEY=VALUE overrides wherever a config is read, and one `error:` line for bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import tiny_config

from llmjax.training.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("module, flags", [
    ("llmjax.train", ["--config", "--workdir", "--compile_only", "--num_devices",
                      "--accelerator", "--coordinator_address"]),
    ("llmjax.prepare", ["--source", "--output", "--tokenizer", "--near_duplicate_threshold"]),
    ("llmjax.evaluate", ["--workdir", "--best", "--data", "--output", "--config"]),
    ("llmjax.bench", ["--config", "--steps", "--warmup", "--packed", "--reference"]),
    ("llmjax.hf", ["--allow_pickle", "--dtype", "--max_shard_size", "--adapter"]),
    ("llmjax.data.bench", ["--config", "--train_steps", "--metrics", "--workers"]),
])
def test_help_lists_every_flag(module, flags):
    result = command(module, "--help", timeout=120)  # absl's help exits with status 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for flag in flags:  # boolean flags read --[no]flag
        assert re.search(rf"--(\[no\])?{flag[2:]}[:=]", result.stdout), (module, flag)


@pytest.mark.parametrize("module, args, message", [
    ("llmjax.train", ["--config=tests/tiny_config.py", "--config.seq_lenn=3"], "seq_lenn"),
    ("llmjax.train", [], "give a config: --config="),
    ("llmjax.train", ["--config=tests/tiny_config.py", "--compile_only", "--accelerator=tpu9"],
     "--accelerator='tpu9': choose one of v4, v5e, v5p"),
    ("llmjax.evaluate", [], "give --workdir="),
    ("llmjax.evaluate", ["--workdir=/no/such/run"], "/no/such/run/checkpoints not found"),
    ("llmjax.hf", ["convert", "a", "b"], "give `import HF_DIR OUT`"),
    ("llmjax.prepare", ["--source=text:/no/such/*.txt", "--output=/tmp/llmjax_x/y"], "no file"),
    ("llmjax.bench", ["--config=configs/bench_reference.py", "--reference=/no/baselines.py"],
     "--reference=/no/baselines.py: no such file"),
])
def test_bad_input_is_one_error_line(module, args, message):
    result = command(module, *args)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert message in line, line


def test_evaluate_takes_config_overrides(tmp_path):
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(tiny_config(num_train_steps=4, eval_every_steps=4), workdir)
    result = command("llmjax.evaluate", f"--workdir={workdir}", "--config.eval_batches=1",
                     f"--output={tmp_path / 'eval.json'}")
    assert result.returncode == 0, result.stderr[-2000:]
    one_batch = json.loads((tmp_path / "eval.json").read_text())
    assert one_batch["batches"] == 1 and one_batch["step"] == 4
    result = command("llmjax.evaluate", f"--workdir={workdir}")
    assert json.loads(result.stdout)["eval/loss"] == pytest.approx(summary["eval/loss"],
                                                                  rel=1e-6)
    assert "note" not in json.loads(result.stdout)  # the held-out data fill every batch
