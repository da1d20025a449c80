"""llmjax writes TensorBoard event files without TensorFlow: TensorFlow's and TensorBoard's
own readers must read them, and a torn last record must be dropped, not fatal."""

import os

import pytest

from llmjax.training import tensorboard


def event_file(logdir):
    (name,) = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents")]
    return os.path.join(logdir, name)


def test_tensorflow_and_tensorboard_read_what_llmjax_writes(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from tensorboard.backend.event_processing import event_accumulator

    writer = tensorboard.EventWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write_scalars(step, {"train/loss": 10.0 / step, "train/mfu": 1.5})
    writer.write_texts(5, {"sample": "To be, or not — to be"})
    writer.close()

    # TensorFlow checks both CRCs of every record.
    seen = {}
    for event in tf.compat.v1.train.summary_iterator(event_file(tmp_path)):
        for value in event.summary.value:
            seen.setdefault(value.tag, []).append(event.step)
    assert seen == {"train/loss": [1, 2, 3, 4, 5], "train/mfu": [1, 2, 3, 4, 5],
                    "sample": [5]}

    accumulator = event_accumulator.EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert [(s.step, s.value) for s in accumulator.Scalars("train/loss")] == [
        (step, pytest.approx(10.0 / step)) for step in range(1, 6)]
    (text,) = accumulator.Tensors("sample")
    assert text.tensor_proto.string_val == ["To be, or not — to be".encode()]


def test_a_torn_last_record_is_dropped_and_the_rest_kept(tmp_path):
    writer = tensorboard.EventWriter(str(tmp_path))
    for step in range(1, 9):
        writer.write_scalars(step, {"train/loss": float(step)})
    writer.close()
    path = event_file(tmp_path)
    with open(path, "rb+") as f:  # a kill in the middle of the last write
        f.truncate(os.path.getsize(path) - 5)
    steps = [e.step for e in tensorboard.events(path) if e.HasField("summary")]
    assert steps == list(range(1, 8))

    tensorboard.drop_events_after(str(tmp_path), 5)
    steps = [e.step for e in tensorboard.events(path) if e.HasField("summary")]
    assert steps == [1, 2, 3, 4, 5]
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_drop_events_after_trims_a_file_tensorflow_wrote(tmp_path):
    tf = pytest.importorskip("tensorflow")
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        for step in range(1, 9):
            tf.summary.scalar("train/loss", 10.0 - step, step=step)
    tensorboard.drop_events_after(str(tmp_path), 5)
    steps = [e.step for e in tf.compat.v1.train.summary_iterator(event_file(tmp_path))
             if e.HasField("summary")]
    assert steps == [1, 2, 3, 4, 5]
