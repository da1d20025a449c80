"""TensorBoard event files, written and trimmed without TensorFlow.

Importing TensorFlow costs a command 6 to 10 s on a 2-core CPU (it loads Keras and
scikit-learn with it); a scalar event is a few hundred bytes of protobuf in a TFRecord
frame, so llmjax writes the frames itself with TensorBoard's own protobuf classes.
TensorBoard, `tf.data.TFRecordDataset` and `tf.compat.v1.train.summary_iterator` read the
files (tests/unit/training/test_tensorboard.py reads them back with both).

A TFRecord frame is: length (uint64, little-endian), masked CRC-32C of those 8 bytes
(uint32), the bytes, masked CRC-32C of the bytes (uint32).
"""

import itertools
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from typing import Any

from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):  # Castagnoli polynomial, reflected
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    # TFRecord's mask: a CRC of data that holds CRCs would otherwise be weak.
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked_crc32c(length)) + data
            + struct.pack("<I", _masked_crc32c(data)))


def records(data: bytes, name: str = "") -> Iterator[bytes]:
    """The records of a TFRecord file's bytes. A cut-off or corrupt last record (what a kill
    mid-write leaves) ends the file with a warning naming it."""
    offset = 0
    while offset < len(data):
        header = data[offset:offset + 12]
        if len(header) == 12:
            (length,) = struct.unpack("<Q", header[:8])
            body = data[offset + 12:offset + 12 + length]
            tail = data[offset + 12 + length:offset + 16 + length]
            if (struct.unpack("<I", header[8:])[0] == _masked_crc32c(header[:8])
                    and len(body) == length and len(tail) == 4
                    and struct.unpack("<I", tail)[0] == _masked_crc32c(body)):
                yield body
                offset += 16 + length
                continue
        logging.warning("%s: dropped its last record, cut off mid-write", name or "events")
        return


_opened = itertools.count()


class EventWriter:
    """Appends scalar and text summaries to a new event file in `logdir`.

    Every write is flushed, so a killed run loses at most the record being written (which
    `drop_events_after` drops). Object stores (gs://) cannot append: there the whole file
    is rewritten per write, as metrics.jsonl is.
    """

    def __init__(self, logdir: str):
        directory = epath.Path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        # TensorBoard orders a directory's files by name: the time first, then what makes
        # the name unique (two writers in one second, in one or more processes).
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_opened)}.v2")
        self._path = directory / name
        self._remote = "://" in logdir
        self._written = b""
        self._file = None if self._remote else open(self._path, "ab")
        self._append(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _append(self, event: event_pb2.Event) -> None:
        data = frame(event.SerializeToString())
        if self._remote:
            self._written += data
            self._path.write_bytes(self._written)
        else:
            self._file.write(data)
            self._file.flush()

    def _summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        self._append(event_pb2.Event(wall_time=time.time(), step=int(step),
                                     summary=summary_pb2.Summary(value=values)))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._summary(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                             for k, v in scalars.items()])

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        # What the text plugin reads: a string tensor marked as its data.
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        self._summary(step, [summary_pb2.Summary.Value(
            tag=k, metadata=metadata,
            tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                          string_val=[v.encode("utf-8")]))
            for k, v in texts.items()])

    def flush(self) -> None:
        if self._file:
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def events(path: str) -> list[event_pb2.Event]:
    """The events of one event file (a cut-off last record dropped)."""
    data = epath.Path(path).read_bytes()
    return [event_pb2.Event.FromString(r) for r in records(data, path)]


def drop_events_after(logdir: str, step: int) -> None:
    """Remove summaries past `step` from the event files in `logdir`.

    A run killed after its last checkpoint may have written summaries for steps it then
    repeats on resume; TensorBoard would draw those steps twice. Each file is rewritten
    beside itself and renamed over the original, so a crash here loses nothing.
    """
    directory = epath.Path(logdir)
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if not path.name.startswith("events.out.tfevents") or path.is_dir():
            continue
        data = path.read_bytes()
        kept, read, end = [], 0, 0
        for record in records(data, str(path)):
            read, end = read + 1, end + 16 + len(record)
            event = event_pb2.Event.FromString(record)
            if not (event.HasField("summary") and event.step > step):
                kept.append(record)
        if end == len(data) and len(kept) == read:
            continue  # nothing past `step` and nothing torn
        tmp = directory / "rewriting.tmp"  # no "tfevents" in it: TensorBoard skips it
        tmp.write_bytes(b"".join(frame(r) for r in kept))
        tmp.replace(path)
