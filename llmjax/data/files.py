"""Files on this machine or in an object store (gs://, or any URL TensorFlow's file systems
know): the one layer through which `sources` reads and `prepare` writes.

Local paths go through the OS (fast, no TensorFlow import); a URL goes through
`tf.io.gfile`, imported only then (it is slow to import).
"""

import glob as _glob
import os
import shutil
from typing import IO


def is_remote(path: str) -> bool:
    return "://" in path


def _gfile():
    from tensorflow.io import gfile  # on demand: seconds to import

    return gfile


def glob(pattern: str) -> list[str]:
    """The files (not directories) matching `pattern`, sorted (`**` works for local paths)."""
    if is_remote(pattern):
        gfile = _gfile()
        return sorted(p for p in gfile.glob(pattern) if not gfile.isdir(p))
    return sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))


def open_file(path: str, mode: str = "rb") -> IO:
    """`open(path, mode)`, for a URL too (raises OSError if it cannot be read)."""
    if not is_remote(path):
        return open(path, mode)  # noqa: SIM115 (the caller closes it)
    gfile = _gfile()
    try:
        if "r" in mode and not gfile.exists(path):
            raise FileNotFoundError(path)
        return gfile.GFile(path, mode)
    except Exception as e:  # noqa: BLE001 (tf raises its own kinds; callers expect OSError)
        if isinstance(e, OSError):
            raise
        raise OSError(str(e)) from None


def size(path: str) -> int:
    """Bytes in `path` (-1 if it cannot be read)."""
    try:
        return _gfile().stat(path).length if is_remote(path) else os.path.getsize(path)
    except Exception:  # noqa: BLE001 (any failure: unknown size; reading it will say why)
        return -1


def version(path: str) -> list[int]:
    """[bytes, modification time in ns] of `path` ([-1, -1] if it cannot be read): what
    tells a rerun that a file changed."""
    try:
        if is_remote(path):
            stat = _gfile().stat(path)
            return [stat.length, stat.mtime_nsec]
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    except Exception:  # noqa: BLE001 (any failure: unknown; reading it will say why)
        return [-1, -1]


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def put(local_path: str, path: str) -> None:
    """Moves the finished local file `local_path` to `path` (an atomic rename locally; an
    object store makes a copy visible whole)."""
    if is_remote(path):
        _gfile().copy(local_path, path, overwrite=True)
        os.remove(local_path)
    else:
        shutil.move(local_path, path)  # a rename on the same file system


def remove_tree(path: str) -> None:
    """Removes the directory `path` and everything in it, if it exists."""
    if is_remote(path):
        gfile = _gfile()
        if gfile.exists(path):
            gfile.rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    with open_file(path, "w") as f:
        f.write(text)


def read_text(path: str) -> str:
    with open_file(path, "r") as f:
        return f.read()
