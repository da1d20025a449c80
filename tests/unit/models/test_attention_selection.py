"""Which attention kernel `model.attention_impl` resolves to, and its block sizes: pure
functions of the backend and the batch, checked without running a kernel."""

import jax.numpy as jnp
import pytest

from llmjax.models import model_config
from llmjax.models.attention_kernels import (
    attention_bytes_per_layer,
    choose_blocks,
    kernel_platform,
    select_kernel,
)


@pytest.mark.parametrize("platform, packed, window, dtype, expected", [
    ("cpu", True, 0, jnp.float32, "chunked"),
    ("cpu", False, 4096, jnp.bfloat16, "chunked"),
    ("tpu", True, 0, jnp.bfloat16, "splash"),
    ("tpu", False, 4096, jnp.float32, "splash"),
    ("gpu", True, 0, jnp.bfloat16, "flash"),  # packed: cuDNN would take a dense mask
    ("gpu", False, 0, jnp.bfloat16, "cudnn"),
    ("gpu", True, 4096, jnp.bfloat16, "cudnn"),  # the Pallas GPU kernel has no window
    ("gpu", False, 0, jnp.float32, "xla"),  # cuDNN takes bf16 / fp16 only
    ("cuda", True, 0, jnp.float16, "flash"),
])
def test_auto_picks_the_kernel_of_the_backend(platform, packed, window, dtype, expected):
    assert select_kernel("auto", platform, packed=packed, sliding_window=window,
                         dtype=dtype) == expected


@pytest.mark.parametrize("forced", ["xla", "chunked", "splash", "flash", "cudnn"])
def test_a_named_kernel_is_used_on_every_backend(forced):
    for platform in ("cpu", "tpu", "gpu"):
        assert select_kernel(forced, platform, packed=True, sliding_window=0,
                             dtype=jnp.float32) == forced


def test_an_unknown_kernel_names_the_key():
    with pytest.raises(ValueError, match="config.model.attention_impl='pallas'"):
        model_config({"vocab_size": 8, "embed_dim": 8, "num_layers": 1, "num_heads": 2,
                      "num_kv_heads": 1, "mlp_dim": 8, "attention_impl": "pallas"})


def test_blocks_follow_length_and_head_dim_unless_the_config_sets_them():
    assert choose_blocks("splash", 8192, 128) == (512, 512)
    assert choose_blocks("splash", 8192, 256) == (256, 256)
    assert choose_blocks("splash", 384, 64) == (128, 128)
    assert choose_blocks("flash", 4096, 64) == (128, 128)
    assert choose_blocks("flash", 4096, 128) == (64, 64)
    assert choose_blocks("splash", 8192, 128, block_q=1024, block_kv=256) == (1024, 256)
    with pytest.raises(ValueError, match="config.seq_len=200"):
        choose_blocks("splash", 200, 64)
    with pytest.raises(ValueError, match="config.model.attention_block_kv=64"):
        choose_blocks("splash", 512, 64, block_kv=64)


def test_attention_memory_per_layer_shrinks_with_a_kernel():
    # One row of 8192 tokens, 8 heads of 128, bf16: XLA keeps fp32 scores and bf16
    # probabilities (8 * 8192^2 * 6 bytes = 3 GiB); a flash kernel its output and lse.
    shape = dict(batch=1, q_length=8192, kv_length=8192, heads=8, head_dim=128, dtype_bytes=2)
    kernel_bytes = 8 * 8192 * (128 * 2 + 4)
    assert attention_bytes_per_layer("splash", **shape) == kernel_bytes
    assert attention_bytes_per_layer("xla", **shape) == 8 * 8192 ** 2 * 6 + kernel_bytes
    # chunked, 64 blocks of 128 queries: block i keeps scores against 128 * (i + 1) keys,
    # (64 + 1) / (2 * 64) of XLA's square.
    chunked = 8 * 128 * 128 * sum(range(1, 65)) * 6 + kernel_bytes
    assert attention_bytes_per_layer("chunked", **shape) == chunked
    assert attention_bytes_per_layer("chunked", **{**shape, "q_length": 4096}) == (
        attention_bytes_per_layer("xla", **{**shape, "q_length": 4096}))  # a split length
    assert kernel_platform("TPU v5p") == "tpu" and kernel_platform("NVIDIA H100") == "gpu"
