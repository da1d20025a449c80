"""Hugging Face directories to and from llmjax runs:

    python -m llmjax.hf import HF_DIR OUT [--allow_pickle]
        HF weights -> an llmjax directory (OUT/config.json, OUT/checkpoints/0, OUT/tokenizer);
        train from it with --config.init_from=OUT
    python -m llmjax.hf export WORKDIR_OR_CHECKPOINT OUT [--dtype=bfloat16] [--max_shard_size=5GB]
        a run's newest checkpoint (or WORKDIR/checkpoints/STEP) -> a directory transformers
        loads; a LoRA run's adapters merged, and in the PEFT layout under OUT/adapter; a
        prefix or prompt run's base model, and its virtual tokens under OUT/adapter
    python -m llmjax.hf export LORA_WORKDIR OUT --adapter
        a LoRA (or prefix, prompt) run's adapter alone (adapter_config.json,
        adapter_model.safetensors in OUT): peft.PeftModel.from_pretrained(base_model, OUT)

What each does: llmjax.training.convert.
"""

import json
import os

from absl import flags

from llmjax import cli
from llmjax.models.layers import DTYPES
from llmjax.training import convert

FLAGS = flags.FLAGS
flags.DEFINE_bool("allow_pickle", False, "import: also read pickle-based .bin weights, which "
                  "can run code when loaded (only from a trusted source).")
flags.DEFINE_enum("dtype", None, sorted(DTYPES), "export: dtype of the written tensors "
                  "(default: the parameters').")
flags.DEFINE_string("max_shard_size", "5GB", "export: largest safetensors file, e.g. 500MB.")
flags.DEFINE_bool("adapter", False, "export: a LoRA, prefix or prompt run's PEFT adapter alone "
                  "(adapter_config.json + adapter_model.safetensors in OUT), not the model.")

USAGE = ("give `import HF_DIR OUT` or `export WORKDIR_OR_CHECKPOINT OUT` "
         "(python -m llmjax.hf --help)")


def main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[1] not in ("import", "export"):
        raise ValueError(USAGE)
    command, source, out = argv[1:]
    if command == "import":
        convert.import_checkpoint(source, out, allow_pickle=FLAGS.allow_pickle)
        print(f"Imported {source} -> {out} (train from it: --config.init_from={out}; "
              f"back to HF: python -m llmjax.hf export {out} DIR)")
    else:
        convert.export_checkpoint(source, out, dtype=FLAGS.dtype,
                                  max_shard_size=FLAGS.max_shard_size,
                                  adapter_only=FLAGS.adapter)
        if FLAGS.adapter:
            print(f"Exported the adapter of {source} -> {out} "
                  f"(peft: PeftModel.from_pretrained(base_model, {out!r}))")
        elif _virtual_tokens(os.path.join(out, "adapter")):
            print(f"Exported {source} -> {out}: the base model (its weights never trained) "
                  f"and, for peft, its virtual tokens: PeftModel.from_pretrained("
                  f"AutoModelForCausalLM.from_pretrained({out!r}), "
                  f"{os.path.join(out, 'adapter')!r})")
        elif os.path.isdir(os.path.join(out, "adapter")):
            print(f"Exported {source} -> {out} (transformers: AutoModel*.from_pretrained("
                  f"{out!r}); the adapter alone, for peft: {os.path.join(out, 'adapter')})")
        else:
            print(f"Exported {source} -> {out} (transformers: AutoModel*.from_pretrained({out!r}))")


def _virtual_tokens(adapter_dir: str) -> bool:
    """Whether an exported adapter holds virtual tokens (prefix or prompt tuning)."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f)["peft_type"] in ("PREFIX_TUNING", "PROMPT_TUNING")


if __name__ == "__main__":
    cli.run(main)
