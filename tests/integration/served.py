"""Running `python -m llmjax.serve` for real in tests: a tiny Hugging Face model with a
trained tokenizer and a chat template, a free loopback port, and a server process that
is ready (warm) before a test talks to it and is stopped after."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
from conftest import xla_flags
from hf_models import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_model_dir(path: str) -> str:
    """A tiny random Llama in `path` with a 300-token BPE tokenizer (trained on the bundled
    plays) that has a chat template."""
    import transformers

    from llmjax.data.sources import read_documents
    from llmjax.data.tokenizer import save_trained, train_bpe

    texts = read_documents("bundled:shakespeare")[:30]
    save_trained(train_bpe(texts, 300), path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    model = make_hf_model("llama", vocab_size=len(tokenizer), max_position_embeddings=128,
                          bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: str, *flags: str, ready_timeout: float = 300) -> Iterator["Server"]:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "llmjax.serve", f"--model={model}", f"--port={port}",
         "--max_seq_len=96", "--max_slots=4", *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    keys = [f.split("=", 1)[1] for f in flags if f.startswith("--api_key=")]
    running = Server(process, f"http://127.0.0.1:{port}",
                     {"Authorization": f"Bearer {keys[0]}"} if keys else {})
    try:
        running.wait_ready(ready_timeout)
        yield running
    finally:
        running.stop()


class Server:
    def __init__(self, process: subprocess.Popen, url: str, headers: dict[str, str]):
        self.process, self.url, self.headers = process, url, headers

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stdout.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", headers=self.headers,
                             timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server was not ready within {timeout:g}s")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.stdout.read() if self.process.stdout else ""

    def metric(self, name: str, **labels: str) -> float:
        """A value of GET /metrics (0 if the series is absent)."""
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                       if labels else "")
        for line in httpx.get(self.url + "/metrics", headers=self.headers,
                              timeout=10).text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0
