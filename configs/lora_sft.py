"""LoRA supervised fine-tuning of a Llama-family model on prompt/response records.

Run:      python -m llmjax.train --config=configs/lora_sft.py \\
              --config.init_from=PATH/Llama-3.2-1B-Instruct \\
              --config.data.tokenizer=PATH/Llama-3.2-1B-Instruct \\
              --config.data.train='jsonl:/data/sft/*.jsonl#prompt+response'
          python -m llmjax.evaluate --workdir=runs/lora_sft --best   # response perplexity
Hardware: one GPU (>= 24 GB) or a TPU v4-8 for a 1B model; a 2-core CPU runs `:tiny`.
Expect:   the loss counts response tokens only (the prompt is context); rank-16 adapters on
          every attention and MLP matrix train ~0.9% of a 1B model's weights, with optimizer
          state for those alone. Eval loss on held-out responses falls within the first few
          hundred steps; the best checkpoint by eval/loss is kept in runs/lora_sft/best.
          Export: `lora.model_params` merges the adapters for `llmjax.hf.save_pretrained`;
          `lora.save_peft` writes adapter_config.json + adapter_model.safetensors for peft.

`:tiny` trains adapters on a 2-layer model from scratch (random frozen weights: a smoke
test of the machinery, not a useful model) on bundled Shakespeare (no file needed):
          python -m llmjax.train --config=configs/lora_sft.py:tiny
8,192 of 115,392 weights (7.1%) train, eval loss 5.27 after 40 steps (ln 259 = 5.56
untrained), 23 s on a 2-core CPU.
"""

from llmjax.config import base_config


def get_config(arg=None):
    config = base_config()
    config.name = "lora_sft"
    config.num_train_steps = 1000
    config.global_batch_size = 32
    config.seq_len = 1024
    config.log_every_steps = 20
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.init_from = "Llama-3.2-1B-Instruct"  # a local HF directory (weights + tokenizer)
    config.data.train = "jsonl:sft.jsonl#prompt+response"  # loss on responses only
    config.data.tokenizer = "Llama-3.2-1B-Instruct"
    config.data.eval_fraction = 0.02

    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.targets = "blocks/(attn/(q|k|v|o)|mlp/(gate|up|down))"

    config.optimizer.learning_rate = 2e-4  # adapters take a higher rate than full fine-tuning
    config.optimizer.warmup_steps = 30
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.0

    config.early_stopping.metric = "eval/loss"
    config.early_stopping.patience = 5

    if arg == "tiny":
        config.num_train_steps = 40
        config.global_batch_size = 8
        config.seq_len = 64
        config.log_every_steps = 10
        config.eval_every_steps = 20
        config.checkpoint_every_steps = 20
        config.init_from = ""
        config.data.train = "bundled:shakespeare"
        config.data.tokenizer = "byte"
        config.data.eval_fraction = 0.05
        config.model.embed_dim = 64
        config.model.num_layers = 2
        config.model.num_heads = 4
        config.model.num_kv_heads = 2
        config.model.mlp_dim = 128
        config.lora.rank = 4
        config.optimizer.learning_rate = 1e-2
        config.optimizer.warmup_steps = 5
    return config
