"""The bad-input catalogue: every input a user gets wrong, run through the real command.

Each case must exit non-zero with a last line `error: ...` that names the key or path,
no traceback, and leave what the workdir held before byte-identical. The cases run in
one interpreter, each in a fork (tests/integration/forked_commands.py), so the table costs
one start-up of JAX rather than one per case. The non-finite run, the checkpoint
fallback and the torn log line succeed or stop by design: tests/integration/
test_reliability.py.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TRAIN = ["--config=tests/tiny_config.py", "--config.num_train_steps=4"]
CLASSIFY = ["--config=configs/bert_sentiment.py:tiny", "--config.num_train_steps=2",
            "--config.data.tokenizer=byte"]

# name -> (module, args with {d}: a scratch directory, {base}: a trained workdir, expected
# in the error line). The base run comes first; cases marked * in the name check that
# the workdir they point at is unchanged.
CASES = {
    "misspelt key": ("llmjax.train", [*TRAIN, "--config.optimizer.shedule=cosine"],
                     "shedule"),
    "wrong type": ("llmjax.train", [*TRAIN, "--config.seq_len=long"], "seq_len"),
    "negative value": ("llmjax.train", [*TRAIN, "--config.global_batch_size=-8",
                                        "--workdir={d}/neg"], "config.global_batch_size=-8"),
    "bad nan_policy": ("llmjax.train", [*TRAIN, "--config.nan_policy=ignore",
                                        "--workdir={d}/np"], "config.nan_policy='ignore'"),
    "missing config file": ("llmjax.train", ["--config={d}/no_such_config.py"],
                            "no_such_config.py"),
    "config syntax error": ("llmjax.train", ["--config={d}/syntax.py"], "syntax.py:2"),
    "config import error": ("llmjax.train", ["--config={d}/imports.py"], "imports.py:1"),
    "glob matching nothing": ("llmjax.train", [*TRAIN, "--workdir={d}/g",
                                               "--config.data.train=text:{d}/none/*.txt"],
                              "{d}/none/*.txt"),
    "empty file": ("llmjax.train", [*TRAIN, "--workdir={d}/e",
                                    "--config.data.train=text:{d}/empty.txt"], "empty.txt"),
    "binary file": ("llmjax.train", [*TRAIN, "--workdir={d}/b",
                                     "--config.data.train=text:{d}/binary.txt"], "binary.txt"),
    "non-UTF-8 file": ("llmjax.train", [*TRAIN, "--workdir={d}/l",
                                        "--config.data.train=text:{d}/latin1.txt"],
                       "latin1.txt"),
    "malformed JSONL": ("llmjax.train", [*TRAIN, "--workdir={d}/m",
                                         "--config.data.train=jsonl:{d}/malformed.jsonl"],
                        "malformed.jsonl"),
    "missing JSONL field": ("llmjax.train", [*TRAIN, "--workdir={d}/f",
                                             "--config.data.train=jsonl:{d}/body.jsonl"],
                            "'text'"),
    "CSV without header": ("llmjax.train", [*CLASSIFY, "--workdir={d}/c",
                                            "--config.data.train=csv:{d}/noheader.csv"],
                           "noheader.csv"),
    "labels outside num_labels": ("llmjax.train", [*CLASSIFY, "--workdir={d}/lab",
                                                   "--config.data.train=jsonl:{d}/labels.jsonl"],
                                  "label 5, outside [0, config.model.num_labels=2)"),
    "sequence longer than positions": ("llmjax.train", [*CLASSIFY, "--workdir={d}/pos",
                                                        "--config.seq_len=128",
                                                        "--config.data.train=jsonl:"
                                                        "{d}/labels_ok.jsonl"],
                                       "config.seq_len=128 is longer than the model's "
                                       "config.model.max_positions=64"),
    "missing tokenizer dir": ("llmjax.train", [*TRAIN, "--workdir={d}/t",
                                               "--config.data.tokenizer={d}/no_tokenizer"],
                              "no_tokenizer"),
    "vocab_size below the tokenizer's": ("llmjax.train", [*TRAIN, "--workdir={d}/v",
                                                          "--config.model.vocab_size=100"],
                                         "config.model.vocab_size=100"),
    "impossible mesh": ("llmjax.train", [*TRAIN, "--workdir={d}/mesh",
                                         "--config.mesh.tensor=3"], "mesh"),
    "init_from without config.json": ("llmjax.train", [*TRAIN, "--workdir={d}/i",
                                                       "--config.init_from={d}/empty_dir"],
                                      "empty_dir/config.json"),
    "init_from config.json not JSON": ("llmjax.train", [*TRAIN, "--workdir={d}/j",
                                                        "--config.init_from={d}/bad_json"],
                                       "bad_json/config.json"),
    "workdir not writable": ("llmjax.train", [*TRAIN, "--workdir=/sys/llmjax_run"],
                             "/sys/llmjax_run"),
    "workdir is a file": ("llmjax.train", [*TRAIN, "--workdir={d}/afile"], "afile"),
    "workdir under a file": ("llmjax.train", [*TRAIN, "--workdir={d}/afile/run"], "afile"),
    "changed model shape *": ("llmjax.train", [*TRAIN, "--workdir={base}",
                                               "--config.model.embed_dim=64"],
                              "config.model.embed_dim: 32 -> 64"),
    "second run in a workdir *": ("llmjax.train", [*TRAIN, "--workdir={base}"],
                                  "is in use by process"),
    "bad line inside metrics.jsonl *": ("llmjax.train", [*TRAIN, "--workdir={d}/torn"],
                                        "metrics.jsonl:2"),
    "evaluate an empty workdir": ("llmjax.evaluate", ["--workdir={d}/empty_dir"],
                                  "empty_dir/checkpoints not found"),
    "evaluate to a full disk *": ("llmjax.evaluate", ["--workdir={base}",
                                                      "--output=/dev/full"], "/dev/full"),
    "export an empty workdir": ("llmjax.hf", ["export", "{d}/empty_dir", "{d}/out"],
                                "empty_dir"),
    "generate from no model": ("llmjax.generate", ["--model={d}/no_model", "--prompt=a"],
                               "no_model"),
    "serve no model": ("llmjax.serve", ["--model={d}/no_model"], "no_model"),
    "prepare into a read-only place": ("llmjax.prepare", ["--source=text:{d}/corpus.txt",
                                                          "--output=/sys/llmjax/data"],
                                       "/sys/llmjax"),
}


def make_inputs(d):
    """The bad (and the few good) files the cases point at."""
    def write(name, content, mode="w"):
        with open(os.path.join(d, name), mode) as f:
            f.write(content)

    write("syntax.py", "def get_config():\n    return (\n")
    write("imports.py", "import no_such_module_anywhere\n")
    write("empty.txt", "")
    write("binary.txt", bytes(range(256)) * 4, "wb")
    write("latin1.txt", "caf\xe9 cr\xe8me ".encode("latin-1") * 50, "wb")
    write("malformed.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    write("body.jsonl", '{"body": "no text field"}\n' * 10)
    write("noheader.csv", "a fine film,1\na bad film,0\n" * 10)
    write("labels.jsonl", "".join(json.dumps({"text": f"review {i}", "label": i % 6}) + "\n"
                                  for i in range(40)))
    write("labels_ok.jsonl", "".join(json.dumps({"text": f"review {i} " * 20,
                                                 "label": i % 2}) + "\n" for i in range(40)))
    write("corpus.txt", "a small corpus\n" * 100)
    write("afile", "a file where a directory should be\n")
    os.makedirs(os.path.join(d, "empty_dir"))
    os.makedirs(os.path.join(d, "bad_json"))
    write("bad_json/config.json", '{"model_type": "llama",\n')
    os.makedirs(os.path.join(d, "torn"))
    write("torn/metrics.jsonl", '{"step": 1}\nnot json\n{"step": 3}\n')


def snapshot(directory):
    """{path: sha256} of every file under `directory`."""
    digests = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("inputs"))
    base = os.path.join(d, "base")
    make_inputs(d)
    cases = [{"name": "base run", "module": "llmjax.train", "args": [*TRAIN, f"--workdir={base}"]}]
    for name, (module, args, _) in CASES.items():
        case = {"name": name, "module": module,
                "args": [a.format(d=d, base=base) for a in args]}
        if name.startswith("second run"):
            case["hold_lock"] = base
        cases.append(case)
    # The base run must exist before snapshots: run it first, then the rest.
    with open(os.path.join(d, "cases.json"), "w") as f:
        json.dump(cases[:1], f)
    subprocess.run([sys.executable, os.path.join(HERE, "forked_commands.py"),
                    os.path.join(d, "cases.json"), os.path.join(d, "base.json")],
                   cwd=REPO, check=True, timeout=600)
    with open(os.path.join(d, "base.json")) as f:
        [base_result] = json.load(f)
    assert base_result["rc"] == 0, base_result["stderr"][-3000:]
    before = {name: snapshot(os.path.join(d, "torn") if "metrics" in name else base)
              for name in CASES if name.endswith("*")}
    with open(os.path.join(d, "cases.json"), "w") as f:
        json.dump(cases[1:], f)
    subprocess.run([sys.executable, os.path.join(HERE, "forked_commands.py"),
                    os.path.join(d, "cases.json"), os.path.join(d, "results.json")],
                   cwd=REPO, check=True, timeout=900)
    with open(os.path.join(d, "results.json")) as f:
        by_name = {r["name"]: r for r in json.load(f)}
    for r in by_name.values():  # shown with -s: what each case costs
        print(f"{r['seconds']:6.1f}s rc={r['rc']} {r['name']}: {r['stderr'].strip()[-200:]}")
    return d, base, before, by_name


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(name, results):
    d, base, before, by_name = results
    result = by_name[name]
    output = result["stdout"] + result["stderr"]
    lines = result["stderr"].strip().splitlines() or [""]
    assert result["rc"] != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert lines[-1].startswith("error: "), output[-3000:]
    assert CASES[name][2].format(d=d, base=base) in lines[-1], lines[-1]
    if name in before:
        after = snapshot(os.path.join(d, "torn") if "metrics" in name else base)
        assert {path: after.get(path) for path in before[name]} == before[name]
