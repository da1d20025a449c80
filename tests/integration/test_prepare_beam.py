"""llmjax.data.prepare with --runner=beam (Beam's DirectRunner): the same kept documents,
report, tokenizer and shard bytes as the local pool; the same bytes again on a rerun with
two workers; the training input reads the result."""

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_config

from llmjax.data import clean, loader, prepare, prepared, sources, tokenizer

pytest.importorskip("apache_beam")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYS = sorted((sources.BUNDLED_DIR / "shakespeare").glob("*.txt"))[:2]
# The per-run, per-path parts of a report (everything else must agree).
RUN_SPECIFIC = ("output", "dataset", "tokenizer", "seconds", "cached")


def write_corpus(directory):
    """Scenes of two bundled plays as JSONL, with planted exact and near duplicates, a
    filtered document and bad input (a malformed line, a file that is not UTF-8)."""
    scenes = [s for play in PLAYS for s in sources.split_scenes(play.read_text())]
    words = scenes[4].split()
    near = " ".join(words[:60] + ["zzzq"] + words[61:])  # one word replaced
    first = scenes[: len(scenes) // 2] + [scenes[1], near, "too short"]
    second = scenes[len(scenes) // 2:] + ["  " + scenes[6].upper().replace(" ", "   ") + " "]
    (directory / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in first)
                                       + "{not json\n")
    (directory / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in second))
    (directory / "c.jsonl").write_bytes(b'{"text": "caf\xe9 au lait, not UTF-8 at all"}\n')
    return len(scenes)


def run(directory, output, runner, beam_options=""):
    return prepare.prepare(prepare.Options(
        sources=(f"jsonl:{directory}/*.jsonl",), output=str(output), tokenizer="bpe:300",
        num_shards=3, validation_fraction=0.1, num_workers=1, runner=runner,
        beam_pipeline_options=beam_options), show_progress=False)


def comparable(report):
    """A report without what names its own run (paths, timings)."""
    options = {k: v for k, v in report["options"].items() if k != "output"}
    return {**{k: v for k, v in report.items() if k not in RUN_SPECIFIC}, "options": options}


def shard_bytes(output):
    version = os.path.join(output, prepared.VERSION)
    return {name: open(os.path.join(version, name), "rb").read()
            for name in sorted(os.listdir(version)) if ".array_record-" in name}


@pytest.fixture(scope="module")
def prepared_both(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    num_scenes = write_corpus(directory)
    local = run(directory, directory / "local" / "corpus", "local")
    beam = run(directory, directory / "beam" / "corpus", "beam", "--direct_num_workers=1")
    return num_scenes, local, beam, directory


def test_beam_keeps_and_writes_what_the_local_pool_does(prepared_both):
    num_scenes, local, beam, _ = prepared_both
    dropped = {r: e["documents"] for r, e in beam["dropped"].items() if e["documents"]}
    assert dropped == {clean.EXACT_DUPLICATE: 2, clean.NEAR_DUPLICATE: 1, clean.TOO_SHORT: 1,
                       "malformed_json": 1, "invalid_utf8": 1}
    assert beam["kept"]["documents"] == num_scenes
    assert comparable(beam) == comparable(local)
    # The same tokenizer (trained on the same sample), the same records in the same shards.
    tokenizer_files = [os.path.join(r["output"], "tokenizer", "tokenizer.json")
                       for r in (local, beam)]
    assert open(tokenizer_files[0]).read() == open(tokenizer_files[1]).read()
    assert shard_bytes(local["output"]) == shard_bytes(beam["output"])
    assert len(shard_bytes(beam["output"])) == 4  # 3 train shards and 1 validation
    for name in ("dataset_info.json", "llmjax.json"):
        texts = [open(os.path.join(r["dataset"], name)).read() for r in (local, beam)]
        assert texts[0] == texts[1], name
    assert os.path.isfile(os.path.join(beam["output"], "report.json"))


def test_beam_rerun_with_two_workers_writes_the_same_bytes(prepared_both):
    _, _, beam, directory = prepared_both
    first = shard_bytes(beam["output"])
    again = run(directory, beam["output"], "beam",
                "--direct_num_workers=2 --direct_running_mode=multi_threading")
    assert shard_bytes(again["output"]) == first
    assert again["kept"] == beam["kept"] and again["dropped"] == beam["dropped"]


def test_training_input_reads_the_beam_prepared_dataset(prepared_both, tmp_path):
    _, _, beam, _ = prepared_both
    config = tiny_config(**{"data.train": f"prepared:{beam['output']}",
                            "data.tokenizer": "bpe:300"})
    tok, train_iter, eval_batches = loader.build(
        config.data, seed=0, seq_len=32, global_batch_size=8, eval_batches=1,
        workdir=str(tmp_path / "run"))
    assert tok.vocab_size == 300 and "the tokenizer of prepared:" in tokenizer.describe(tok)
    assert not (tmp_path / "run" / "tokenizer").exists()  # the dataset's, not a new bpe:300
    batch = next(train_iter)
    assert batch["inputs"].shape == (8, 32) and int(batch["inputs"].max()) < 300
    # The batches hold the dataset's records (the eval batch: the validation split).
    validation = prepared.open_split(beam["output"], "validation")
    starts = {tuple(int(t) for t in validation[i]["tokens"][:6]) for i in range(len(validation))}
    assert tuple(eval_batches[0]["inputs"][0, :6].tolist()) in starts


def test_runner_beam_without_beam_installed_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("some text long enough to keep, and more of it")
    # A sitecustomize that hides apache_beam, as if it were not installed.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['apache_beam'] = None\n")
    result = subprocess.run(
        [sys.executable, "-m", "llmjax.prepare", f"--source=text:{tmp_path}/a.txt",
         f"--output={tmp_path}/out/corpus", "--tokenizer=byte", "--runner=beam"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert result.stderr.strip() == ('error: --runner=beam needs Apache Beam: '
                                     'pip install -e ".[beam]"')
