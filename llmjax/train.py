"""Train a model: python -m llmjax.train --config=configs/NAME.py[:ARG] [--workdir=DIR]
[--config.KEY=VALUE ...]

Rerunning the same command in the same workdir (default runs/NAME) resumes from the
newest complete checkpoint. `--compile_only` is the fit check: it compiles the train
step for the configured mesh (on `--num_devices` simulated CPU devices if asked) and
prints per-device memory and FLOPs without allocating anything, then whether that fits
the chip (`--accelerator=v5p`, or the device it runs on) and, when it does not, the first
layouts that do (llmjax.training.memory). What a run does:
llmjax.training.loop; every config key: llmjax/config.py.
"""

import os

import jax
from absl import flags
from ml_collections import config_flags

from llmjax import cli, runtime
from llmjax.config import validate
from llmjax.parallel import distributed
from llmjax.training import accelerators, loop, memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/NAME.py[:ARG]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and logs go (default: runs/NAME).")
flags.DEFINE_bool("compile_only", False, "Fit check: compile the train step for the configured "
                  "mesh and print per-device memory and FLOPs; allocate nothing, train nothing.")
flags.DEFINE_integer("num_devices", 0, "With --compile_only: simulate this many CPU devices "
                     "(e.g. 64 for a v5p-128 slice).")
flags.DEFINE_string("accelerator", "", "With --compile_only: the chip to judge the fit against "
                    "(v4, v5e, v5p, v6e, a100-40gb, a100-80gb, h100, h200, b200; a slice "
                    "name such as v5p-128 names its chip); default: the device it runs on.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process "
                    "runs outside TPU pods and Slurm (which need nothing).")
flags.DEFINE_integer("num_processes", 0, "With --coordinator_address: number of processes.")
flags.DEFINE_integer("process_id", -1, "With --coordinator_address: this process's index.")


def main(argv: list[str]) -> None:
    del argv
    config = cli.loaded_config()
    if FLAGS.compile_only:
        if FLAGS.num_devices:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)
        validate(config)
        accelerator, source = _accelerator(FLAGS.accelerator)
        report = memory.fit_check(config)
        print(memory.format_report(config, report, accelerator), flush=True)
        for line in memory.verdict_lines(config, report, accelerator, source):
            print(line, flush=True)
        return
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if jax.process_index() == 0:
        print(runtime.describe(), flush=True)
    loop.train_and_evaluate(config, FLAGS.workdir or os.path.join("runs", config.name))


def _accelerator(name: str) -> tuple[accelerators.Accelerator | None, str]:
    if name:
        return accelerators.by_name(name), "--accelerator"
    device = jax.devices()[0]
    return accelerators.of_device(device), device.device_kind


if __name__ == "__main__":
    cli.run(main)
