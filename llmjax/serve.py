"""Serve a model over HTTP: python -m llmjax.serve --model=PATH [--port=8000] [--api_key=KEY]

An OpenAI-compatible server (llmjax.inference.server): /v1/completions,
/v1/chat/completions, /v1/models, /tokenize, /detokenize, /tokenizer_info, /health,
/ready, /metrics and a chat page at /. PATH is what llmjax.generate takes: a run's
workdir (--best for its best checkpoint), one checkpoint, an imported or a Hugging Face
directory; the tokenizer comes with it. The engine compiles everything before /ready
answers 200. SIGTERM (or Ctrl-C) stops admitting (503), finishes what is in flight and
exits 0; a second one exits at once.
"""

import os
import sys
import threading
from typing import Any

import uvicorn
from absl import flags

from llmjax import cli
from llmjax.inference import quantize
from llmjax.inference.engine import Engine
from llmjax.inference.runner import EngineRunner
from llmjax.inference.server import create_app
from llmjax.inference.texts import Texts
from llmjax.parallel import sharding
from llmjax.training import restore

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A workdir, checkpoint, imported or Hugging Face directory.")
flags.DEFINE_bool("best", False, "A workdir's best checkpoint (early stopping), not its newest.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` (default: the "
                    "LLMJAX_API_KEY environment variable; unset: no key).")
flags.DEFINE_integer("max_slots", 8, "Sequences decoded at once.")
flags.DEFINE_integer("max_seq_len", 1024, "Prompt plus generated tokens per sequence, at most.")
flags.DEFINE_integer("max_queue", 64, "Requests that may wait for a slot; more get 429.")
flags.DEFINE_enum("quantize", "none", list(quantize.QUANTIZE_MODES), "int8: weights stored "
                  "int8 with per-channel scales; w8a8: the inputs of each product quantized to "
                  "int8 too (faster on a CPU).")
flags.DEFINE_string("served_model_name", None, "The model's name in the API (default: the "
                    "directory's name).")
flags.DEFINE_string("chat_template", None, "A Jinja chat template file (default: the "
                    "tokenizer's).")
flags.DEFINE_float("request_timeout", 600.0, "Seconds a request may take; then 504.")
flags.DEFINE_float("drain_timeout", 300.0, "On SIGTERM, seconds to finish in-flight requests.")


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT drains the engine before shutting down."""

    def __init__(self, config: uvicorn.Config, runner: EngineRunner, drain_timeout: float):
        super().__init__(config)
        self.runner, self.drain_timeout, self.draining = runner, drain_timeout, False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True
        print("draining: no new requests; finishing those in flight", file=sys.stderr,
              flush=True)
        threading.Thread(target=self._drain_then_exit, daemon=True).start()

    def _drain_then_exit(self) -> None:
        finished = self.runner.drain(self.drain_timeout)
        print("drained" if finished else f"drain timed out after {self.drain_timeout:g}s",
              file=sys.stderr, flush=True)
        self.should_exit = True


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; flags only (see --help)")
    if not FLAGS.model:
        raise ValueError("give --model=PATH: a workdir, checkpoint, imported or HF directory")
    chat_template = None
    if FLAGS.chat_template:
        if not os.path.isfile(FLAGS.chat_template):
            raise FileNotFoundError(f"--chat_template={FLAGS.chat_template}: no such file")
        with open(FLAGS.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    tokenizer = restore.load_tokenizer_of(FLAGS.model)
    texts = Texts(tokenizer, chat_template)
    mesh, rules = sharding.placement()
    model = restore.load_model(FLAGS.model, mesh=mesh, rules=rules, best=FLAGS.best)
    engine = Engine(quantize.quantize_model(model, FLAGS.quantize), max_slots=FLAGS.max_slots,
                    max_seq_len=FLAGS.max_seq_len,
                    eos_ids=restore.eos_ids_of(FLAGS.model, tokenizer),
                    detokenize=tokenizer.decode, prompt_logprobs=True, mesh=mesh, rules=rules)
    runner = EngineRunner(engine, max_queue=FLAGS.max_queue)
    name = FLAGS.served_model_name or os.path.basename(os.path.normpath(FLAGS.model))
    app = create_app(runner, texts, model_name=name,
                     api_key=FLAGS.api_key or os.environ.get("LLMJAX_API_KEY") or None,
                     request_timeout=FLAGS.request_timeout)
    runner.start()
    print(f"serving {name} on http://{FLAGS.host}:{FLAGS.port} (warming up: /ready answers "
          "503 until it is done)", file=sys.stderr, flush=True)
    server = DrainingServer(uvicorn.Config(app, host=FLAGS.host, port=FLAGS.port,
                                           log_level="warning"), runner, FLAGS.drain_timeout)
    server.run()
    runner.stop()


if __name__ == "__main__":
    cli.run(main)
