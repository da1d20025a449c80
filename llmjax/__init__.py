"""llmjax: language models in JAX, from raw text to a served, evaluated model."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m llmjax.<command>` is importing its package
    from llmjax import runtime

    runtime.preload_allocator()
