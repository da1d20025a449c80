#!/usr/bin/env python3
"""Train on a GPU cluster with Slurm: one process per node, all of the node's GPUs.

    python launch/slurm.py --nodes=4 --gpus_per_node=8 [--partition=P] [--time=24:00:00] \
        [--dry_run] -- --config=configs/llama3_8b.py --workdir=/shared/runs/llama8b

Writes an sbatch script beside the workdir (or prints it with --dry_run) and submits it.
`srun` starts `python -m llmjax.train` on every node; `jax.distributed.initialize()`
finds the coordinator, process count and ids from Slurm's variables by itself. Slurm
sends SIGTERM before a time limit or preemption (`--signal`): llmjax saves a checkpoint
and exits cleanly, and `--requeue` starts the job again, which resumes.
"""

import argparse
import os
import shlex
import subprocess
import sys


def sbatch_script(args, train_args: list[str]) -> str:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --time={args.time}",
        f"#SBATCH --output={args.log_dir}/%x-%j.out",
        "#SBATCH --signal=TERM@120",  # two minutes to save before the time limit
        "#SBATCH --requeue",
    ]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(args.repo)}",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
        "srun --kill-on-bad-exit=1 " + shlex.join([args.python, "-m", "llmjax.train",
                                                  *train_args]),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--cpus_per_task", type=int, default=32)
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--job_name", default="llmjax")
    parser.add_argument("--log_dir", default="slurm_logs")
    parser.add_argument("--repo", default=os.getcwd(), help="llmjax checkout on shared disk")
    parser.add_argument("--python", default="python3")
    parser.add_argument("--script", default="", help="where to write the sbatch script")
    parser.add_argument("--dry_run", action="store_true", help="print script and command only")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    script = sbatch_script(args, train_args)
    path = args.script or os.path.join(args.log_dir, f"{args.job_name}.sbatch")
    submit = ["sbatch", path]
    if args.dry_run:
        print(f"# {path}\n{script}")
        print(shlex.join(submit))
        return 0
    os.makedirs(args.log_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    return subprocess.run(submit).returncode


if __name__ == "__main__":
    sys.exit(main())
