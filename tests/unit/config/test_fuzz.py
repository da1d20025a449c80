"""Property-based fuzzing of what a user types: any value of a config key's type, and any
data source string, is accepted or refused with a ValueError/FileNotFoundError naming it;
nothing else escapes (which the command line would print as a traceback)."""

import math

import ml_collections
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmjax.config import base_config, validate
from llmjax.data import sources


def leaves(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


KEYS = sorted((k, type(v)) for k, v in leaves(base_config()) if not k.startswith("model."))
VALUES = {int: st.integers(-10, 10**7), float: st.floats(allow_nan=True, allow_infinity=True),
          str: st.text(max_size=20), bool: st.booleans()}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(KEYS).flatmap(lambda kt: st.tuples(st.just(kt[0]), VALUES[kt[1]])))
def test_any_value_of_a_keys_type_passes_or_is_a_value_error_naming_it(key_value):
    key, value = key_value
    config = base_config()
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    try:
        validate(config)
    except ValueError as e:
        assert leaf in str(e) or "config." in str(e), (key, value, str(e))
    else:
        if isinstance(value, float):  # a float key that passes is a number we can train with
            assert math.isfinite(value), (key, value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcdjlnopstx:/*#=.,0123456789", max_size=30))
def test_any_source_string_parses_or_is_a_value_error(text):
    try:
        sources.parse_source(text, "config.data.train")
    except (ValueError, FileNotFoundError) as e:
        assert "config.data.train" in str(e) or text in str(e), (text, str(e))


def test_the_fuzzed_keys_cover_the_schema():
    assert len(KEYS) > 40 and ("optimizer.learning_rate", float) in KEYS
    config = base_config()
    config.optimizer.weight_decay = math.inf  # what the fuzzing found first
    with pytest.raises(ValueError, match=r"config.optimizer.weight_decay=inf must be a finite"):
        validate(config)
