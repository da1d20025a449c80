"""llama.cpp as a row of the generation benchmark (llmjax.training.benchmark_generation):
the reference Llama written as a GGUF file with the `gguf` package, decoded greedily
through llama-cpp-python's C API with every sequence of a batch in one `llama_decode`.

llama-cpp-python is not a dependency: `pip install llama-cpp-python gguf` builds
llama.cpp from source (CMake and a C++ compiler; on 2 cores, tens of minutes). Without
it the row is left out and the table says so.

The GGUF holds the weights in fp32, as the other rows run them. Its vocabulary is
placeholder text (the 256 byte symbols of byte-level BPE, one merge, then filler): the benchmark
feeds token ids, and llama.cpp needs only a vocabulary of the right size to accept them.
"""

import json
import os
import sys
import time
from typing import Any

import numpy as np

FLAT_NAMES = {  # within layer N: Hugging Face model.layers.N.NAME -> GGUF blk.N.NAME
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def available() -> str | None:
    """None if llama-cpp-python and gguf import, else why not (for the table)."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama.cpp row left out ({e.name} is not installed: pip install " \
               "llama-cpp-python gguf builds it)"
    return None


def _rope_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """q or k [heads * head_dim, embed] from Hugging Face's RoPE layout (the two halves of
    each head rotated together) to GGML's (adjacent pairs rotated together)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(hf_dir: str, path: str) -> str:
    """The Llama in `hf_dir` (config.json, model.safetensors) as the GGUF file `path`."""
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    vocab = config["vocab_size"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.get("rope_theta")
                              or config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    symbols = _byte_symbols()
    space = symbols[ord(" ")]  # llama.cpp wants at least one merge: two spaces
    tokens = (symbols + [space * 2] + [f"<filler{i}>" for i in range(vocab)])[:vocab]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(symbols)
                           + [gguf.TokenType.USER_DEFINED] * (vocab - len(symbols)))
    writer.add_token_merges([f"{space} {space}"])
    writer.add_bos_token_id(config.get("bos_token_id") or 1)
    writer.add_eos_token_id(config.get("eos_token_id") or 2)
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    writer.add_tensor("output.weight", head)
    for layer in range(config["num_hidden_layers"]):
        for theirs, ours in FLAT_NAMES.items():
            value = tensors[f"model.layers.{layer}.{theirs}"]
            if theirs.startswith("self_attn.q_proj"):
                value = _rope_pairs(value, heads)
            elif theirs.startswith("self_attn.k_proj"):
                value = _rope_pairs(value, kv_heads)
            writer.add_tensor(f"blk.{layer}.{ours}", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's base symbols)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


class BatchedGreedy:
    """Greedy decoding of a batch of prompts in one llama.cpp context: one sequence id per
    row, each step one `llama_decode` over a token from every row."""

    def __init__(self, gguf_path: str, max_rows: int, max_length: int):
        import llama_cpp

        self.lib = lc = llama_cpp
        self._log = lc.llama_log_callback(_quiet)  # kept: llama.cpp holds the C pointer
        lc.llama_log_set(self._log, None)
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(gguf_path.encode(),
                                                   lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        params = lc.llama_context_default_params()
        params.n_ctx = max_rows * max_length
        params.n_batch = params.n_ubatch = max_rows * max_length
        params.n_seq_max = max_rows
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(max_rows * max_length, 0, max_rows)

    def _decode(self, rows: list[tuple[int, list[int], int]]) -> np.ndarray:
        """rows: (sequence, tokens, first position); the logits [rows, vocab] of each
        row's last token."""
        batch, n = self.batch, 0
        for seq, tokens, start in rows:
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + i, 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = i == len(tokens) - 1
                n += 1
        batch.n_tokens = n
        if self.lib.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        logits = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(logits, shape=(len(rows), self.vocab))

    def generate(self, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
        """prompts [rows, length] -> the greedy continuations [rows, new_tokens]."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        rows, length = prompts.shape
        out = np.zeros((rows, new_tokens), np.int32)
        logits = self._decode([(r, prompts[r].tolist(), 0) for r in range(rows)])
        for step in range(new_tokens):
            out[:, step] = logits.argmax(-1)
            if step + 1 < new_tokens:
                logits = self._decode([(r, [int(out[r, step])], length + step)
                                       for r in range(rows)])
        return out


def _quiet(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log callback: its loading and graph messages would bury the table."""
    del level, text, user_data


def w_generate_llamacpp(install: str, hf_dir: str, prompts: dict[int, np.ndarray],
                        first: dict[int, np.ndarray], new_tokens: int) -> dict[str, Any]:
    """(In a worker.) Register `llamacpp_b{B}` and `llamacpp_ttft{L}`; return the greedy
    outputs and the seconds the conversion to GGUF took."""
    registry = sys.modules[install]._REG
    start = time.perf_counter()
    path = write_gguf(hf_dir, os.path.join(hf_dir, "model-f32.gguf"))
    converted = time.perf_counter() - start
    longest = max(p.shape[1] for p in first.values())
    length = max(max(p.shape[1] for p in prompts.values()) + new_tokens, longest + 1)
    decoder = BatchedGreedy(path, max(prompts), length)
    outputs = {}
    for batch, prompt in prompts.items():
        outputs[f"llamacpp_b{batch}"] = decoder.generate(prompt, new_tokens)
        registry[f"llamacpp_b{batch}"] = (
            lambda p=prompt: decoder.generate(p, new_tokens))
    for n, prompt in first.items():
        registry[f"llamacpp_ttft{n}"] = lambda p=prompt: decoder.generate(p, 1)
        registry[f"llamacpp_ttft{n}"]()
    return {"outputs": outputs, "convert_seconds": converted,
            "gguf_bytes": os.path.getsize(path)}
