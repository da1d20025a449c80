"""Attention kernels: which one runs (`model.attention_impl`), its block sizes, and how it
runs per shard under a mesh.

    xla     jax.nn.dot_product_attention's XLA path: materialises [heads, length, length]
            scores; runs everywhere
    chunked the same arithmetic in blocks of queries, each block against only the keys it
            can see (causal, and a sliding window's start): about half the work of xla
            for long rows; causal attention only (the choice of `auto` on CPU)
    cudnn   jax.nn.dot_product_attention's cuDNN flash attention (GPU, bf16/fp16); packed
            segment ids reach it as a boolean mask
    splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention):
            causal, sliding-window and full masks with SegmentIds; GQA/MQA natively
            (K/V keep their own heads); the choice of `auto` on TPU
    flash   Pallas GPU flash attention (jax.experimental.pallas.ops.gpu.attention) with
            segment ids; no sliding window, K/V repeated to the query heads for GQA; the
            choice of `auto` on GPU for packed batches without a window

Off their own chips the Pallas kernels run in interpret mode (slow; what the CPU tests
use). Under a mesh the Pallas kernels run inside `shard_map` over the mesh axes that the
logical-axis rules in scope give `act_batch` and `act_heads`; when the rules split the
length (`act_length`, sequence parallelism) the kernel sees each row whole, the queries
gathered as keys and values already are, so the work is shared over batch and heads only.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

KERNELS = ("auto", "xla", "chunked", "splash", "flash", "cudnn")
PALLAS_KERNELS = ("splash", "flash")
SPLASH_MIN_BLOCK = 128  # splash's kv compute block is a multiple of the TPU's 128 lanes
# chunked's query block: the benchmark's training step (configs/bench_reference.py, rows
# of 512) on 2 Intel Xeon cores ran 917 tokens/s in blocks of 128, 886 in 256, 859 in 64.
CHUNKED_BLOCK_Q = 128


def select_kernel(requested: str, platform: str, *, packed: bool, sliding_window: int,
                  dtype: jnp.dtype) -> str:
    """The kernel `requested` ("auto" or one of KERNELS) resolves to on `platform`
    ("cpu", "tpu", "gpu"/"cuda"/"rocm") for a batch with (`packed`) or without segment ids.

    auto: splash on TPU; on GPU the Pallas flash kernel for packed batches (cuDNN takes
    segment ids only as a dense mask, off its fast path) unless a sliding window needs
    cuDNN, cuDNN for unpacked ones, XLA where cuDNN does not take the dtype (float32);
    XLA on CPU.
    """
    if requested not in KERNELS:
        raise ValueError(f"config.model.attention_impl={requested!r}: choose one of {KERNELS}")
    if requested != "auto":
        return requested
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm"):
        if packed and not sliding_window:
            return "flash"
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    return "chunked"


class Blocks(NamedTuple):
    """Query and key/value tile lengths of a Pallas kernel (forward and backward)."""
    q: int
    kv: int


def choose_blocks(kernel: str, length: int, head_dim: int, block_q: int = 0,
                  block_kv: int = 0) -> Blocks:
    """Tile lengths for `kernel` on rows of `length` with heads of `head_dim`: the config's
    `attention_block_q` / `attention_block_kv` where set (> 0), else the largest tile that
    divides the length, up to 512 for splash (256 with heads over 128 wide, which fill a
    TPU core's VMEM sooner) and 128 for flash (64 over 64 wide: a GPU's shared memory)."""
    if kernel == "splash":
        largest = 512 if head_dim <= 128 else 256
        candidates = [b for b in (512, 256, 128) if b <= largest]
        if length % SPLASH_MIN_BLOCK:
            raise ValueError(f"config.seq_len={length}: splash attention needs a multiple of "
                             f"{SPLASH_MIN_BLOCK}; set config.model.attention_impl=xla")
    else:
        largest = 128 if head_dim <= 64 else 64
        candidates = [b for b in (128, 64, 32, 16) if b <= largest]
    chosen = next((b for b in candidates if length % b == 0), length)
    blocks = Blocks(block_q or chosen, block_kv or chosen)
    for name, size in (("attention_block_q", blocks.q), ("attention_block_kv", blocks.kv)):
        if length % size or (kernel == "splash" and size % SPLASH_MIN_BLOCK):
            need = f"a multiple of {SPLASH_MIN_BLOCK} that " if kernel == "splash" else ""
            raise ValueError(f"config.model.{name}={size}: {kernel} attention needs {need}"
                             f"divides the sequence length {length}")
    return blocks


def _splash_kernel(length: int, heads: int, mqa: bool, causal: bool, sliding_window: int,
                   blocks: Blocks, interpret: bool):
    """A splash kernel for one row: q [heads, length, head_dim]. Made where it runs (in
    the shard_map body under a mesh): its mask tables are constants of that context."""
    shape = (length, length)
    if sliding_window:
        mask = splash.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    elif causal:
        mask = splash.CausalMask(shape)
    else:
        mask = splash.FullMask(shape)
    sizes = splash.BlockSizes(
        block_q=blocks.q, block_kv=blocks.kv, block_kv_compute=blocks.kv,
        block_q_dkv=blocks.q, block_kv_dkv=blocks.kv, block_kv_dkv_compute=blocks.kv,
        block_q_dq=blocks.q, block_kv_dq=blocks.kv)
    make = splash.make_splash_mqa if mqa else splash.make_splash_mha
    with jax.ensure_compile_time_eval():  # its tables are constants, even when made in a jit
        return make(splash.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                    q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, segment_ids, *, causal, sliding_window, blocks, interpret):
    """Splash attention on [batch, length, heads, head_dim] (k, v with kv_heads)."""
    batch, length, heads, head_dim = q.shape
    mqa = k.shape[2] == 1
    kernel = _splash_kernel(length, heads, mqa, causal, sliding_window, blocks, interpret)
    # Splash does not scale the logits; heads lead and the length follows.
    q = jnp.swapaxes(q * (1.0 / math.sqrt(head_dim)), 1, 2)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if mqa:
        k, v = k[:, 0], v[:, 0]
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v, ids)
    return jnp.swapaxes(out, 1, 2)


def _flash(q, k, v, segment_ids, *, causal, sliding_window, blocks, interpret):
    """Pallas GPU flash attention on [batch, length, heads, head_dim]."""
    if sliding_window:
        raise ValueError("config.model.attention_impl=flash has no sliding window "
                         "(config.model.sliding_window): choose cudnn, splash or xla")
    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # the kernel takes as many K/V heads as query heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    sizes = gpu_attention.BlockSizes(
        block_q=blocks.q, block_k=blocks.kv, block_q_dkv=blocks.q, block_kv_dkv=blocks.kv,
        block_q_dq=blocks.q, block_kv_dq=blocks.kv)
    return gpu_attention.mha(q, k, v, segment_ids, sm_scale=1.0 / math.sqrt(q.shape[-1]),
                             causal=causal, block_sizes=sizes, interpret=interpret)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      segment_ids: jax.Array | None, *, sliding_window: int = 0,
                      block_q: int = 0) -> jax.Array:
    """Causal attention as jax.nn.dot_product_attention's XLA path computes it (scaled
    logits in float32, masked with the same large negative number, softmax in float32),
    one block of `block_q` queries at a time (0: CHUNKED_BLOCK_Q) against the keys from
    the first its sliding window reaches to its last query. A causal row of n blocks
    then computes (n + 1) / 2n of the scores the whole square has: 62.5% at 512 tokens
    in blocks of 128, forward and backward. Masked-out logits add exactly 0 to a softmax,
    so each row's result is the same up to summation order.

    q [batch, length, heads, head_dim]; k, v [batch, length, kv_heads, head_dim];
    segment_ids [batch, length] or None. Returns [batch, length, heads, head_dim].
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    block = block_q or CHUNKED_BLOCK_Q
    groups = heads // kv_heads
    # Heads first, once, each K/V head's queries as rows (a query's group of heads
    # together): every block's products then read contiguous rows of [batch, kv_heads,
    # rows, head_dim]. Sliced per block from [batch, length, heads, ...] instead, or with
    # the groups as a dimension of their own, one layer's forward and backward took 25 to
    # 45% longer.
    rows = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
    rows = rows.reshape(batch, kv_heads, length * groups, head_dim)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [batch, kv_heads, length, head_dim]
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = jnp.array(1.0 / math.sqrt(head_dim), logits_dtype)
    masked = jnp.array(-0.7 * float(jnp.finfo(logits_dtype).max), logits_dtype)
    outputs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        first = max(0, start - sliding_window + 1) if sliding_window else 0
        logits = jnp.einsum("bkrh,bksh->bkrs", rows[:, :, start * groups:end * groups],
                            k[:, :, first:end], preferred_element_type=logits_dtype) * scale
        query_pos = np.arange(start, end)[:, None]
        key_pos = np.arange(first, end)[None, :]
        visible = key_pos <= query_pos
        if sliding_window:
            visible &= query_pos - key_pos < sliding_window
        mask = jnp.asarray(np.repeat(visible, groups, axis=0))  # [rows, keys]
        if segment_ids is not None:  # [batch, 1, rows, keys]
            same = segment_ids[:, start:end, None] == segment_ids[:, None, first:end]
            mask = (mask & jnp.repeat(same, groups, axis=1))[:, None]
        probs = jax.nn.softmax(jnp.where(mask, logits, masked).astype(jnp.float32), axis=-1)
        outputs.append(jnp.einsum("bkrs,bksh->bkrh", probs.astype(v.dtype),
                                  v[:, :, first:end]))
    out = jnp.concatenate(outputs, axis=2).reshape(batch, kv_heads, length, groups, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, length, heads, head_dim)


def _mesh_axes(logical: str, size: int, mesh) -> tuple[str, ...] | None:
    """The mesh axes the rules in scope give `logical`, if they divide `size` (else None:
    that dim stays whole on every device)."""
    axes = linen.logical_to_mesh_axes((logical,))[0]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def pallas_attention(kernel: str, q: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array | None, *, causal: bool, sliding_window: int,
                     block_q: int = 0, block_kv: int = 0) -> jax.Array:
    """`kernel` ("splash" or "flash") on q [batch, length, heads, head_dim], k, v
    [batch, length, kv_heads, head_dim], per shard of the mesh in scope (if any).

    Returns [batch, length, heads, head_dim]. `segment_ids` [batch, length] or None.
    """
    interpret = jax.default_backend() != ("tpu" if kernel == "splash" else "gpu")
    blocks = choose_blocks(kernel, q.shape[1], q.shape[-1], block_q, block_kv)
    run = functools.partial(_splash if kernel == "splash" else _flash, causal=causal,
                            sliding_window=sliding_window, blocks=blocks, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q, k, v, segment_ids)
    batch = _mesh_axes("act_batch", q.shape[0], mesh)
    heads = _mesh_axes("act_heads", q.shape[2], mesh)
    shards = 1 if heads is None else math.prod(mesh.shape[a] for a in heads)
    if k.shape[2] % shards:
        # K/V heads that the head shards do not divide: repeat each just enough that every
        # shard holds its own queries' K/V heads (lcm(kv_heads, shards) of them in all).
        repeats = math.lcm(k.shape[2], shards) // k.shape[2]
        k, v = jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)
    qkv_spec = P(batch, None, heads, None)
    ids_spec = P(batch, None)
    if segment_ids is None:
        sharded = jax.shard_map(lambda q, k, v: run(q, k, v, None), mesh=mesh,
                                in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)
        return sharded(q, k, v)
    sharded = jax.shard_map(run, mesh=mesh, in_specs=(qkv_spec,) * 3 + (ids_spec,),
                            out_specs=qkv_spec, check_vma=False)
    return sharded(q, k, v, segment_ids)


def attention_bytes_per_layer(kernel: str, *, batch: int, q_length: int, kv_length: int,
                              heads: int, head_dim: int, dtype_bytes: int) -> int:
    """What one layer's attention keeps for the backward pass on one device besides its
    q, k, v inputs, for the `batch` rows, `q_length` queries and `heads` heads a device
    computes against `kv_length` keys.

    The flash kernels (splash, flash, cudnn): the output and a float32 log-sum-exp per
    query ([batch, heads, q_length]). xla: also the float32 scores and the probabilities,
    [batch, heads, q_length, kv_length] each; chunked: those of each block of queries
    against the keys up to its last (causal, without a window), where a device holds
    whole rows (q_length == kv_length; else it runs xla).
    """
    kept = batch * heads * q_length * (head_dim * dtype_bytes + 4)
    if kernel == "chunked" and q_length == kv_length:
        ends = {start: min(start + CHUNKED_BLOCK_Q, q_length)
                for start in range(0, q_length, CHUNKED_BLOCK_Q)}
        scores = sum((end - start) * end for start, end in ends.items())
        kept += batch * heads * scores * (4 + dtype_bytes)
    elif kernel in ("xla", "chunked"):
        kept += batch * heads * q_length * kv_length * (4 + dtype_bytes)
    return kept


def kernel_platform(device_kind: str) -> str:
    """"tpu" or "gpu" for a chip's device kind (llmjax.training.accelerators)."""
    return "tpu" if device_kind.lower().startswith("tpu") else "gpu"

