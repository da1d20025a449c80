"""Generate text: python -m llmjax.generate --model=PATH --prompt=TEXT [--prompt=TEXT ...]

PATH is a run's workdir (its newest checkpoint, or --best), one checkpoint directory
WORKDIR/checkpoints/STEP, an imported directory or a Hugging Face model directory; the
tokenizer comes with it. Prompts come from --prompt (repeatable) or --prompts=FILE.jsonl
(field `prompt`); they are decoded together by the engine (llmjax.inference.engine:
KV cache, continuous batching over --max_slots). Greedy at --temperature=0 (the default).
Completions go to stdout, or with --output=FILE.jsonl one object per prompt: prompt,
completion, token ids, finish reason, and with --logprobs=N each token's logprob and its N
most likely alternatives.
"""

import json
import os
import sys

from absl import flags
from tqdm import tqdm

from llmjax import cli
from llmjax.inference import quantize
from llmjax.inference.engine import Engine
from llmjax.inference.requests import SamplingParams
from llmjax.parallel import sharding
from llmjax.training import restore

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A workdir, checkpoint, imported or Hugging Face directory.")
flags.DEFINE_bool("best", False, "A workdir's best checkpoint (early stopping), not its newest.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts", "", "A JSONL file with one {\"prompt\": ...} per line.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this much "
                   "probability (1: all).")
flags.DEFINE_integer("seed", 0, "Seed of the sampling (prompt i uses seed + i).")
flags.DEFINE_multi_string("stop", [], "A string that ends a completion (repeatable).")
flags.DEFINE_enum("quantize", "none", list(quantize.QUANTIZE_MODES), "int8: weights stored "
                  "int8 with per-channel scales (activations and cache stay float); w8a8: "
                  "the inputs of each product quantized to int8 too (faster on a CPU).")
flags.DEFINE_integer("max_slots", 8, "Sequences decoded at once.")
flags.DEFINE_integer("max_seq_len", 0, "Positions of the KV cache per sequence (0: the longest "
                     "prompt plus --max_new_tokens).")
flags.DEFINE_integer("logprobs", 0, "With --output: each token's logprob and its N most "
                     "likely alternatives.")
flags.DEFINE_string("output", "", "Write one JSON object per prompt here (JSONL).")


def read_prompts() -> list[str]:
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts:
        if not os.path.isfile(FLAGS.prompts):
            raise FileNotFoundError(f"--prompts={FLAGS.prompts}: no such file")
        with open(FLAGS.prompts, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"--prompts={FLAGS.prompts} line {number}: expected a "
                                     'JSON object with a "prompt" string') from None
    if not prompts:
        raise ValueError("give --prompt=TEXT (repeatable) or --prompts=FILE.jsonl")
    return prompts


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; flags only (see --help)")
    if not FLAGS.model:
        raise ValueError("give --model=PATH: a workdir, checkpoint, imported or HF directory")
    texts = read_prompts()
    tokenizer = restore.load_tokenizer_of(FLAGS.model)
    prompts = [[tokenizer.bos_id] + tokenizer.encode(text) for text in texts]
    mesh, rules = sharding.placement()
    model = restore.load_model(FLAGS.model, mesh=mesh, rules=rules, best=FLAGS.best)
    model = quantize.quantize_model(model, FLAGS.quantize)
    longest = max(len(p) for p in prompts) + FLAGS.max_new_tokens
    engine = Engine(model, max_slots=FLAGS.max_slots, max_seq_len=FLAGS.max_seq_len or longest,
                    eos_ids=restore.eos_ids_of(FLAGS.model, tokenizer),
                    detokenize=tokenizer.decode, mesh=mesh, rules=rules)
    params = [SamplingParams(max_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                             top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed + i,
                             stop=tuple(FLAGS.stop), logprobs=FLAGS.logprobs)
              for i in range(len(prompts))]
    for prompt, sampling in zip(prompts, params):  # bad lengths fail before compiling
        engine.check(prompt, sampling)
    print(f"warm-up (compiling): {engine.warmup():.1f}s", file=sys.stderr, flush=True)
    requests = [engine.submit(p, q) for p, q in zip(prompts, params)]
    with tqdm(total=len(requests), desc="generate", unit="prompt", file=sys.stderr,
              disable=len(requests) < 4) as bar:
        while engine.has_work():
            engine.step()
            bar.update(sum(r.finished for r in requests) - bar.n)
    out = open(FLAGS.output, "w", encoding="utf-8") if FLAGS.output else None
    for text, request in zip(texts, requests):
        record = {"prompt": text, "completion": request.text, "tokens": request.tokens,
                  "finish_reason": request.finish_reason}
        if FLAGS.logprobs:
            record["logprobs"] = request.logprobs
            record["top_logprobs"] = request.top_logprobs
        if out is not None:
            out.write(json.dumps(record) + "\n")
        else:
            print(text + request.text, flush=True)
    if out is not None:
        out.close()
        print(f"wrote {len(requests)} completions to {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
