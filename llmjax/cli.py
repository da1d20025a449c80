"""What the commands share: absl flag parsing and errors as one line.

Every command (llmjax/train.py, prepare.py, evaluate.py, bench.py, generate.py, serve.py,
hf/__main__.py) defines its own absl flags (underscores; `--help` lists them) and ends
with `cli.run(main)`. A user error anywhere below prints one line `error: ...` naming the
key or path and the fix, and exits with status 1: a ValueError or FileNotFoundError from
the library, a filesystem error (read-only, permission, a file in the way, disk full), a
bad flag or `--config.KEY=VALUE` override, a config file that fails to load (its file and
line). `--verbosity=1` (or more) shows the traceback instead, for bug reports.
"""

import errno
import os
import sys
import traceback
from collections.abc import Callable

import ml_collections
from absl import app, flags, logging

from llmjax import runtime

# TensorFlow (loaded by TFDS) prints C++ start-up logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# transformers warns "PyTorch was not found" on import; llmjax uses it for tokenizers only.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# What to do about a filesystem error, by errno.
_OS_FIXES = {
    errno.EACCES: "check its permissions, or give a path you can write",
    errno.EPERM: "check its permissions, or give a path you can write",
    errno.EROFS: "it is on a read-only filesystem: give a writable path",
    errno.EEXIST: "a file is in the way: move it, or give another path",
    errno.ENOTDIR: "a file is in the way where a directory should be: give another path",
    errno.EISDIR: "it is a directory: give a file",
    errno.ENOSPC: "the disk is full: free space (what was saved before is intact) and "
                  "rerun the command",
    errno.EDQUOT: "the disk quota is exceeded: free space and rerun the command",
}


def _wants_traceback(argv: list[str]) -> bool:
    """--verbosity=N (N >= 1) or -v N on the command line: show tracebacks."""
    for i, arg in enumerate(argv):
        value = (arg.split("=", 1)[1] if arg.startswith(("--verbosity=", "-v="))
                 else argv[i + 1] if arg in ("--verbosity", "-v") and i + 1 < len(argv)
                 else None)
        if value is not None:
            try:
                return int(value) >= 1
            except ValueError:
                return False
    return False


def _config_file_error(e: BaseException) -> str:
    """Where a config file failed to load: FILE:LINE: TYPE: MESSAGE."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}"
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if "site-packages" not in f.filename
            and not f.filename.startswith("<") and os.sep + "llmjax" + os.sep
            not in f.filename]
    where = (user or frames)[-1]
    return f"{where.filename}:{where.lineno}: {type(e).__name__}: {e}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad flag, --config override or config file in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        if _wants_traceback(argv):
            raise
        detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").strip("'\"").split())
        sys.exit(f"error: bad flag or --config override: {detail}")
    except Exception as e:  # a config file's own code (configs/NAME.py) failed to load
        if _wants_traceback(argv):
            raise
        sys.exit(f"error: the config file does not load: {_config_file_error(e)}; fix that "
                 "line (--verbosity=1 shows the traceback)")


def loaded_config(flag_name: str = "config", example: str = "configs/shakespeare.py"
                  ) -> ml_collections.ConfigDict:
    """The config of a `config_flags.DEFINE_config_file` flag, or a one-line exit."""
    try:
        config = flags.FLAGS[flag_name].value
        if config is None:
            sys.exit(f"error: give a config: --{flag_name}={example}")
        config.get("name")  # a config file that failed to load raises here
    except OSError as e:
        sys.exit(f"error: cannot load the config file: {str(e).splitlines()[-1].strip()}")
    return config


def user_error(e: BaseException) -> str | None:
    """The `error: ...` line of a user-caused error, or None for a bug (a traceback).

    Looks through the chain of causes: Orbax and TensorFlow wrap filesystem errors.
    """
    if isinstance(e, ValueError | FileNotFoundError):
        return f"error: {e}"
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _OS_FIXES:
            path = e.filename or "a file"
            return f"error: {path}: {e.strerror}; {_OS_FIXES[e.errno]}"
        e = e.__cause__ or e.__context__
    return None


def run(main: Callable[[list[str]], None], compilation_cache: bool = True) -> None:
    """app.run(main) with library INFO logs off (unless --verbosity is given), user
    errors printed as one `error: ...` line (`user_error`), and XLA's persistent
    compilation cache on (llmjax.runtime) unless `compilation_cache` is False."""
    def wrapped(argv: list[str]) -> None:
        if compilation_cache:
            runtime.enable_compilation_cache()
        verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # Orbax and TFDS INFO lines drown ours
        try:
            main(argv)
        except Exception as e:
            line = None if verbose else user_error(e)
            if line is None:
                raise
            sys.exit(line)

    app.run(wrapped, flags_parser=parse_flags)
