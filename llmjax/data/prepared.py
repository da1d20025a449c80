"""Prepared datasets: tokenized documents as a TFDS dataset in array_record files.

`python -m llmjax.prepare --output=DIR/NAME` writes

    DIR/NAME/1.0.0/                      the TFDS dataset (builder directory)
        dataset_info.json, features.json
        NAME-train.array_record-00000-of-00004, ...   shuffled shards
        NAME-validation.array_record-00000-of-00001
        llmjax.json                      which tokenizer made the tokens, and totals
    DIR/NAME/tokenizer/                  the tokenizer, if prepare trained one
    DIR/NAME/report.json                 what was kept and dropped, and why

Each record is {"tokens": [n] ids (uint16 when the vocabulary fits, else int32; [bos] +
text + [eos]), "prompt_length": int}: the number of leading tokens that are never a
training target (1 + prompt tokens for a fine-tuning example, 0 for plain text).

Read it back with `tfds.data_source("NAME", data_dir="DIR")`, or
`tfds.builder_from_directory("DIR/NAME/1.0.0")`, or `open_split` here; neither needs
TensorFlow (records are decoded with numpy).
"""

import json
import os
import re
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from llmjax.data import files

VERSION = "1.0.0"
METADATA_FILE = "llmjax.json"
TOKENIZER_SUBDIR = "tokenizer"
FILE_FORMAT = "array_record"
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def check_name(output: str) -> str:
    """The dataset name (basename of `output`); ValueError if TFDS would not accept it."""
    name = os.path.basename(os.path.normpath(output))
    if not _NAME.fullmatch(name):
        raise ValueError(f"--output={output!r}: its last part {name!r} is the dataset name and "
                         "must be lowercase letters, digits and _ (starting with a letter), "
                         f"e.g. {re.sub(r'[^a-z0-9_]', '_', name.lower()) or 'my_corpus'}")
    return name


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def features(vocab_size: int):
    """The tfds.features of a record; tokens stored as raw bytes (fast to decode, compact)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "tokens": tfds.features.Tensor(shape=(None,), dtype=token_dtype(vocab_size),
                                       encoding=tfds.features.Encoding.BYTES),
        "prompt_length": tfds.features.Scalar(dtype=np.int32),
    })


def shard_filename(name: str, split: str, index: int, count: int) -> str:
    return f"{name}-{split}.{FILE_FORMAT}-{index:05d}-of-{count:05d}"


def write_shard(path: str, records: Iterable[dict[str, Any]], feature_spec) -> tuple[int, int]:
    """Writes records to one array_record file (atomically: a temp file renamed).

    Returns (number of records, bytes written).
    """
    from array_record.python import array_record_module
    from tensorflow_datasets.core import example_serializer

    # array_record writes local files: a shard bound for an object store is made here first.
    scratch = (os.path.join(tempfile.mkdtemp(), os.path.basename(path)) if files.is_remote(path)
               else path + ".incomplete")
    # group_size:1 makes every record its own chunk: fastest random access, which is how
    # tfds.data_source and the training loader read.
    writer = array_record_module.ArrayRecordWriter(scratch, "group_size:1")
    # feature_spec.serialize_example writes the proto's feature map in an order that can
    # differ between processes; sorted keys make a shard the same bytes on any worker.
    serializer = example_serializer.ExampleSerializer(feature_spec.get_serialized_info())
    count = num_bytes = 0
    for record in records:
        serialized = serializer.get_tf_example(feature_spec.encode_example(record)
                                               ).SerializeToString(deterministic=True)
        writer.write(serialized)
        count += 1
        num_bytes += len(serialized)
    writer.close()
    files.put(scratch, path)
    return count, num_bytes


def write_metadata(version_dir: str, name: str, feature_spec,
                   splits: dict[str, tuple[list[int], int]], metadata: dict[str, Any],
                   description: str) -> None:
    """dataset_info.json + features.json (TFDS) and llmjax.json beside the shards.

    `splits` maps a split name to (records per shard, total bytes).
    """
    import tensorflow_datasets as tfds

    split_infos = [
        tfds.core.SplitInfo(
            name=split, shard_lengths=shard_lengths, num_bytes=num_bytes,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=version_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                dataset_name=name, split=split, filetype_suffix=FILE_FORMAT))
        for split, (shard_lengths, num_bytes) in splits.items()]
    tfds.folder_dataset.write_metadata(data_dir=version_dir, features=feature_spec,
                                       split_infos=split_infos, version=VERSION,
                                       check_data=False, description=description)
    files.write_text(os.path.join(version_dir, METADATA_FILE), json.dumps(metadata, indent=2))


def version_dir(path: str, source: str = "") -> str:
    """The TFDS builder directory of a prepared dataset given as DIR/NAME or DIR/NAME/1.0.0."""
    path = path if files.is_remote(path) else os.path.expanduser(path)
    for candidate in (path, os.path.join(path, VERSION)):
        if files.size(os.path.join(candidate, METADATA_FILE)) >= 0:  # (gs:// too)
            return candidate
    raise FileNotFoundError(f"data source {source or path!r}: {path} is not a dataset written by "
                            "python -m llmjax.prepare (no "
                            f"{os.path.join(VERSION, METADATA_FILE)}); run prepare first")


def read_metadata(path: str, source: str = "") -> dict[str, Any]:
    """llmjax.json of a prepared dataset, with `tokenizer` made a loadable spec."""
    directory = version_dir(path, source)
    metadata = json.loads(files.read_text(os.path.join(directory, METADATA_FILE)))
    tokenizer_spec = metadata["tokenizer"]
    if (tokenizer_spec != "byte" and not os.path.isabs(tokenizer_spec)
            and not files.is_remote(tokenizer_spec)):
        # Stored relative to DIR/NAME, so the dataset can be moved as a whole.
        joined = os.path.join(os.path.dirname(directory.rstrip("/")), tokenizer_spec)
        # (normpath would fold the // of gs://)
        metadata["tokenizer"] = joined if files.is_remote(joined) else os.path.normpath(joined)
    return metadata


def split_names(path: str, source: str = "") -> list[str]:
    info = json.loads(files.read_text(os.path.join(version_dir(path, source),
                                                   "dataset_info.json")))
    return [split["name"] for split in info.get("splits", [])]


def open_split(path: str, split: str = "train", source: str = ""):
    """Random-access records of one split: `len()`, and `[i]` -> {"tokens", "prompt_length"}.

    Reads with tfds (`builder_from_directory(...).as_data_source`), which decodes with numpy;
    the result pickles, so grain worker processes can read from it too.
    """
    import tensorflow_datasets as tfds

    directory = version_dir(path, source)
    names = split_names(path, source)
    if split not in names:
        raise ValueError(f"data source {source or path!r} has no split {split!r}; it has "
                         f"{', '.join(names)}")
    return tfds.builder_from_directory(directory).as_data_source(split=split)
