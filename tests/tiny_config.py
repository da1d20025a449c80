"""The tests' tiny config as a config file, for running llmjax.train as a subprocess."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # noqa: E402


def get_config(arg=None):
    del arg
    return tiny_config()
