"""Hugging Face models in and out of llmjax.

    model = llmjax.hf.from_pretrained("path/to/hf_dir")   # a Flax NNX module, sharded
    logits = model(tokens)               # [batch, length] ids -> [batch, length, vocab]
    llmjax.hf.save_pretrained(model, "out_dir", tokenizer="path/to/hf_dir")

    adapters.py  per family: HF model types, config both ways, one Rule per parameter
    reader.py    HF directory -> llmjax model, each device reading only its slice
    writer.py    llmjax model -> HF directory (sharded safetensors, tokenizer files)
    peft.py      LoRA adapters -> the PEFT layout
    __main__.py  python -m llmjax.hf import | export (runs <-> HF directories)

Reading and writing run directories (import, export, init_from) is llmjax.training's:
it needs the run's checkpoints.
"""

from llmjax.hf.reader import from_pretrained, padding_inputs, read_hf_config
from llmjax.hf.writer import copy_tokenizer_files, save_pretrained

__all__ = ["copy_tokenizer_files", "from_pretrained", "padding_inputs", "read_hf_config",
           "save_pretrained"]
