"""The keys every training config has, their defaults, and the checks on their values.

A config file (configs/NAME.py) starts from `base_config()` and changes what its job
needs; a key that is not here is a typo and fails with a message naming it. `validate`
is the one place a config is checked: every section here, the model section through its
family's dataclass (llmjax.models.model_config), the task against the model (`check_task`).
"""

import importlib.util
import json
import math
from typing import Any

import ml_collections

SCHEDULES = ("cosine", "linear", "constant", "wsd", "rsqrt")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
TASKS = ("lm", "classify", "mlm")
PACKINGS = ("first_fit", "concat")
NAN_POLICIES = ("stop", "skip_step")  # llmjax.training.nonfinite
PEFT_METHODS = ("lora", "prefix", "prompt")  # llmjax.training.peft_methods


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0
    c.num_train_steps = 1000
    c.global_batch_size = 32
    c.seq_len = 256
    c.grad_accum_steps = 1  # microbatches per optimizer step
    c.z_loss = 0.0
    c.log_every_steps = 50
    c.eval_every_steps = 200
    c.eval_batches = 8  # held-out batches per evaluation
    c.checkpoint_every_steps = 500
    c.max_to_keep = 3
    c.async_checkpointing = True
    c.peak_flops_per_device = 0.0  # for MFU; 0 = the chip's table peak (on CPU a nominal one)
    c.init_from = ""  # HF model dir or llmjax workdir: its architecture and weights (llmjax.hf)
    c.task = "lm"  # lm (next token) | classify (sequence labels: llmjax.data.classify)
    #              | mlm (masked tokens, BERT: llmjax.training.masking)
    c.nan_policy = "stop"  # a NaN/inf loss or gradient norm: stop | skip_step (drop, count)

    c.data = ml_collections.ConfigDict()
    c.data.train = "bundled:shakespeare"  # a source, or a mixture "SRC=0.7,SRC=0.3"
    c.data.eval = ""  # empty: hold out `eval_fraction` of data.train (its validation split)
    c.data.eval_fraction = 0.05
    c.data.tokenizer = "bpe:4096"  # with a prepared: source, bpe:N uses the dataset's own
    c.data.packing = "first_fit"  # or "concat" (concatenate-then-split: no padding)
    c.data.packing_bins = 8  # first_fit window, in rows per row shard: wider pads less
    c.data.num_workers = 0  # grain worker processes per host (0: pack in the train process)
    c.data.tfds_data_dir = ""  # where tfds: sources are prepared (empty: TFDS's default)

    c.model = ml_collections.ConfigDict()
    c.model.family = "llama"
    c.model.vocab_size = 0  # 0: the tokenizer's size
    c.model.embed_dim = 256
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.head_dim = 0  # 0: embed_dim // num_heads
    c.model.mlp_dim = 768
    c.model.rope_theta = 10000.0
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = False
    c.model.init_std = 0.02
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.scan_layers = True
    c.model.scan_unroll = 0  # layers per scan iteration; 0: all on a CPU, 1 elsewhere
    c.model.remat_policy = "none"
    c.model.attention_impl = "auto"  # auto | xla | chunked | splash | flash | cudnn (see README)
    c.model.attention_block_q = 0  # splash / flash tiles, chunked block; 0: chosen
    c.model.attention_block_kv = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.decay_fraction = 0.2  # wsd: share of training spent decaying
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9  # sgd

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.sequence = 1  # splits activations along the sequence (long contexts)
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1  # across slices (multislice)
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_sequence = 1
    c.mesh.dcn_tensor = 1
    c.mesh.rules = "fsdp+tp"

    c.mlm = ml_collections.ConfigDict()  # task "mlm" (llmjax.training.masking)
    c.mlm.mask_rate = 0.15  # share of the maskable tokens (not special, not padding) predicted
    c.mlm.mask_token_share = 0.8  # of those: replaced by the mask token,
    c.mlm.random_token_share = 0.1  # by a random token; the rest are kept as they are
    c.mlm.mask_id = -1  # -1: the tokenizer's mask token (config.json records the id)

    c.lora = ml_collections.ConfigDict()  # llmjax.training.lora
    c.lora.rank = 0  # 0: train every parameter; > 0: adapters of this rank, the rest frozen
    c.lora.alpha = 16.0  # adapters are scaled by alpha / rank
    c.lora.targets = "blocks/attn/(q|v)"  # regex over parameter paths that get adapters
    c.lora.trainable = ""  # regex over parameter paths trained in full (heads), e.g. "score"

    # What a fine-tuning run trains (llmjax.training.peft_methods). lora: config.lora decides
    # (rank 0, the default: every parameter); prefix: a trained key/value prefix in every
    # layer; prompt: trained embeddings before the input. Virtual tokens train alone.
    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"  # lora | prefix | prompt
    c.peft.num_virtual_tokens = 20  # prefix / prompt: virtual tokens before every document

    c.early_stopping = ml_collections.ConfigDict()
    c.early_stopping.metric = ""  # e.g. "eval/loss": keep the best checkpoint in workdir/best
    c.early_stopping.mode = "min"  # min | max: which way is better
    c.early_stopping.patience = 0  # stop after this many evaluations without a better metric

    c.logging = ml_collections.ConfigDict()  # beyond metrics.jsonl and TensorBoard
    c.logging.wandb_project = ""  # a W&B project: log there too (pip install -e ".[wandb]")
    c.logging.wandb_entity = ""  # the W&B team or user (empty: the account's default)
    c.logging.wandb_run_name = ""  # empty: W&B names the run
    c.logging.wandb_tags = ""  # comma-separated, e.g. "baseline,shakespeare"

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = ""
    c.sample.max_new_tokens = 0  # 0: no sample at the end of training
    c.sample.temperature = 0.8
    c.sample.top_k = 40
    return c


def _unknown_keys(config: Any, reference: Any, prefix: str) -> list[str]:
    unknown = []
    for key, value in config.items():
        if key not in reference:
            unknown.append(prefix + key)
        elif prefix + key == "config.model":
            continue  # each family has its own keys: llmjax.models.model_config checks them
        elif isinstance(value, ml_collections.ConfigDict | dict):
            unknown += _unknown_keys(value, reference[key], f"{prefix}{key}.")
    return unknown


def _leaves(config: Any, prefix: str) -> list[tuple[str, Any]]:
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first bad key or value.

    The model section is checked as its family reads it, unless `init_from` replaces it
    (then the resolved model is checked when the run is assembled).
    """
    from llmjax.models import model_config
    from llmjax.parallel.sharding import RULE_PRESETS

    unknown = _unknown_keys(config, base_config(), "config.")
    if unknown:
        raise ValueError(f"{unknown[0]} is not a known key (typo? see llmjax/config.py)")
    for key, value in _leaves(config, "config."):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value} must be a finite number")
    for key in ("num_train_steps", "global_batch_size", "seq_len", "grad_accum_steps",
                "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "max_to_keep"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key}={config[key]} must be a positive integer")
    if config.global_batch_size % config.grad_accum_steps:
        raise ValueError(f"config.global_batch_size={config.global_batch_size} is not divisible "
                         f"by config.grad_accum_steps={config.grad_accum_steps}")
    opt = config.optimizer
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={opt.schedule!r}: choose one of {SCHEDULES}")
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={opt.name!r}: choose one of {OPTIMIZERS}")
    if opt.learning_rate < 0 or opt.warmup_steps < 0:
        raise ValueError("config.optimizer.learning_rate and warmup_steps must be >= 0")
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}: choose one of {TASKS}")
    if config.nan_policy not in NAN_POLICIES:
        raise ValueError(f"config.nan_policy={config.nan_policy!r}: choose one of "
                         f"{NAN_POLICIES}")
    if config.mesh.rules not in RULE_PRESETS:
        raise ValueError(f"config.mesh.rules={config.mesh.rules!r}: choose one of "
                         f"{sorted(RULE_PRESETS)}")
    if config.data.packing not in PACKINGS:
        raise ValueError(f"config.data.packing={config.data.packing!r}: choose one of "
                         f"{PACKINGS}")
    if int(config.lora.rank) < 0:
        raise ValueError(f"config.lora.rank={config.lora.rank} must be >= 0 (0: no LoRA)")
    _check_peft(config)
    stop = config.early_stopping
    if stop.mode not in ("min", "max"):
        raise ValueError(f"config.early_stopping.mode={stop.mode!r}: choose min or max")
    if int(stop.patience) < 0 or (int(stop.patience) and not stop.metric):
        raise ValueError("config.early_stopping.patience must be >= 0 and needs "
                         "config.early_stopping.metric (e.g. eval/loss)")
    mlm = config.get("mlm") or base_config().mlm  # a config.json from before the section
    if not 0.0 < mlm.mask_rate <= 1.0:
        raise ValueError(f"config.mlm.mask_rate={mlm.mask_rate} must be in (0, 1]")
    if (min(mlm.mask_token_share, mlm.random_token_share) < 0
            or mlm.mask_token_share + mlm.random_token_share > 1.0):
        raise ValueError(f"config.mlm.mask_token_share={mlm.mask_token_share} and "
                         f"random_token_share={mlm.random_token_share} must be >= 0 and add "
                         "up to at most 1 (the rest of the masked tokens are kept)")
    if not 0.0 <= config.data.eval_fraction < 1.0:
        raise ValueError(f"config.data.eval_fraction={config.data.eval_fraction} must be in [0, 1)")
    if not config.data.eval and config.data.eval_fraction == 0.0:
        raise ValueError("config.data.eval is empty and config.data.eval_fraction is 0: "
                         "give an eval source or hold out a fraction")
    check_logging(config.logging)
    if not config.init_from:
        # vocab_size 0 means "the tokenizer's": any size checks the other fields.
        check_task(config.task, model_config(config.model, vocab_size=1))


def check_logging(settings: ml_collections.ConfigDict) -> None:
    """ValueError if a W&B key is set without a project, or the project without wandb
    (an optional extra) installed."""
    for key in ("wandb_entity", "wandb_run_name", "wandb_tags"):
        if settings[key] and not settings.wandb_project:
            raise ValueError(f"config.logging.{key} is set but config.logging.wandb_project "
                             "is empty: name the W&B project to log to")
    if settings.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ValueError("config.logging.wandb_project is set but wandb is not installed: "
                         'pip install -e ".[wandb]" (or leave the key empty)')


def _check_peft(config: ml_collections.ConfigDict) -> None:
    peft = config.peft
    if peft.method not in PEFT_METHODS:
        raise ValueError(f"config.peft.method={peft.method!r}: choose one of {PEFT_METHODS}")
    if peft.method == "lora":
        return
    method = f"config.peft.method={peft.method!r}"
    if int(peft.num_virtual_tokens) <= 0:
        raise ValueError(f"config.peft.num_virtual_tokens={peft.num_virtual_tokens} must be "
                         f"positive with {method}")
    if int(config.lora.rank):
        raise ValueError(f"config.lora.rank={config.lora.rank} and {method} do not combine: "
                         "set config.lora.rank=0 (or config.peft.method=lora)")
    if config.task != "lm":
        raise ValueError(f"{method} trains a language model: set config.task=lm (or "
                         "config.peft.method=lora for a classifier)")
    if int(config.sample.max_new_tokens):
        raise ValueError(f"config.sample.max_new_tokens={config.sample.max_new_tokens}: the "
                         f"inference engine does not run the virtual tokens of {method} "
                         "yet; set config.sample.max_new_tokens=0")


def check_task(task: str, model_cfg: Any) -> None:
    """ValueError unless the model can be trained for `task`: next-token logits for "lm"
    (a decoder without a classifier head), a classifier head for "classify", a masked-LM
    head (BERT) for "mlm"."""
    from llmjax.models import DECODERS, MASKED_LMS, family_of

    num_labels = getattr(model_cfg, "num_labels", 0)
    family = family_of(model_cfg)
    if task == "lm" and (family not in DECODERS or num_labels):
        hint = " (or mlm: masked-LM pretraining)" if family in MASKED_LMS else ""
        raise ValueError(f"config.model.family={family!r} with num_labels="
                         f"{num_labels} is a classifier: set config.task=classify{hint}")
    if task == "mlm" and family not in MASKED_LMS:
        raise ValueError(f"config.task=mlm needs an encoder (config.model.family one of "
                         f"{', '.join(MASKED_LMS)}); a decoder {family!r} trains with "
                         "config.task=lm")
    if task == "classify" and not num_labels:
        raise ValueError("config.task=classify needs config.model.num_labels > 0")


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
    """A copy of `config` with {"dotted.key": value} set, as --config.KEY=VALUE would."""
    changed = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = changed
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return changed


def check_positions(seq_len: int, model_cfg: Any, num_virtual_tokens: int = 0) -> None:
    """ValueError if rows of `seq_len` tokens (after `num_virtual_tokens`, which move every
    position up) do not fit a model with learned positions (the model checks it too, but
    only once data is read and the step traced)."""
    max_positions = getattr(model_cfg, "max_positions", 0)
    if max_positions and seq_len + num_virtual_tokens > max_positions:
        virtual = (f" plus config.peft.num_virtual_tokens={num_virtual_tokens}"
                   if num_virtual_tokens else "")
        raise ValueError(f"config.seq_len={seq_len}{virtual} is longer than the model's "
                         f"config.model.max_positions={max_positions}: lower config.seq_len")


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`config.KEY: OLD -> NEW` for every key whose value differs between two config
    dicts (a key that one of them lacks reads as its default)."""
    return _changes(old, new, base_config().to_dict(), "config.")


def _changes(old: dict, new: dict, defaults: Any, prefix: str) -> list[str]:
    changes = []
    defaults = defaults if isinstance(defaults, dict) else {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _changes(before, after, defaults.get(key), f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changes


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)
