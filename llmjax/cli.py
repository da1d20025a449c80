"""What the commands share: absl flag parsing and errors as one line.

Every command (llmjax/train.py, prepare.py, evaluate.py, bench.py, hf/__main__.py) defines
its own absl flags (underscores; `--help` lists them) and ends with `cli.run(main)`. A user
error anywhere below, a ValueError or FileNotFoundError from the library, a bad flag or a
bad `--config.KEY=VALUE` override, prints one line `error: ...` and exits with status 1.
"""

import os
import sys
from collections.abc import Callable

import ml_collections
from absl import app, flags, logging

# TensorFlow (loaded by TFDS and the TensorBoard writer) prints C++ start-up logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# transformers warns "PyTorch was not found" on import; llmjax uses it for tokenizers only.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad flag or --config override reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").strip("'\"").split())
        sys.exit(f"error: bad flag or --config override: {detail}")


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


def run(main: Callable[[list[str]], None]) -> None:
    """app.run(main) with library INFO logs off (unless --verbosity is given) and user
    errors (ValueError, FileNotFoundError) printed as `error: ...`."""
    def wrapped(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # Orbax, clu, TFDS INFO lines drown ours
        try:
            main(argv)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")

    app.run(wrapped, flags_parser=parse_flags)
