#!/usr/bin/env python3
"""Train on a Cloud TPU VM slice (or several, multislice) with queued resources.

    python launch/tpu.py --name=llama8b --zone=us-east5-a --accelerator=v5p-128 \
        [--num_slices=2] [--spot] [--teardown] [--dry_run] -- \
        --config=configs/llama3_8b.py --workdir=gs://BUCKET/runs/llama8b

Steps: create the queued resource and wait until it is ACTIVE; copy this checkout
(`git archive HEAD`) to every worker and `pip install -e .[tpu]`; run
`python -m llmjax.train ARGS` on all workers at once (JAX finds its peers from the TPU
metadata; multislice peers from the MEGASCALE variables the queued resource sets),
streaming every worker's output here; with --teardown, delete the resource after.
`--dry_run` prints the gcloud commands instead of running them. Use a gs:// workdir:
workers have no shared disk.
"""

import argparse
import shlex
import subprocess
import sys
import time


def node_ids(args) -> list[str]:
    if args.num_slices == 1:
        return [args.name]
    return [f"{args.name}-{i}" for i in range(args.num_slices)]


def gcloud(args, *words: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def create_command(args) -> list[str]:
    cmd = gcloud(args, "queued-resources", "create", args.name,
                 f"--accelerator-type={args.accelerator}",
                 f"--runtime-version={args.runtime_version}")
    if args.num_slices == 1:
        cmd.append(f"--node-id={args.name}")
    else:
        cmd += [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"]
    if args.spot:
        cmd.append("--spot")
    return cmd


def state_command(args) -> list[str]:
    return gcloud(args, "queued-resources", "describe", args.name,
                  "--format=value(state.state)")


def ssh_command(args, node: str, remote: str) -> list[str]:
    return gcloud(args, "tpu-vm", "ssh", node, "--worker=all", f"--command={remote}")


def copy_commands(args, node: str) -> list[list[str]]:
    return [gcloud(args, "tpu-vm", "scp", args.archive, f"{node}:llmjax.tar", "--worker=all"),
            ssh_command(args, node, "mkdir -p ~/llmjax && tar -xf ~/llmjax.tar -C ~/llmjax && "
                                    "cd ~/llmjax && pip install -q -e '.[tpu]'")]


def train_remote(train_args: list[str]) -> str:
    return "cd ~/llmjax && python3 -m llmjax.train " + shlex.join(train_args)


def delete_command(args) -> list[str]:
    return gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet")


def plan(args, train_args: list[str]) -> dict[str, list[list[str]]]:
    """The commands of each phase, in order (between create and install, the launcher
    polls `state_command` until the resource is ACTIVE)."""
    nodes = node_ids(args)
    return {
        "create": [["git", "archive", "--format=tar", f"--output={args.archive}", "HEAD"],
                   create_command(args)],
        "install": [cmd for node in nodes for cmd in copy_commands(args, node)],
        "train": [ssh_command(args, node, train_remote(train_args)) for node in nodes],
        "teardown": [delete_command(args)] if args.teardown else [],
    }


def run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def wait_active(args, timeout_s: float = 3600) -> None:
    deadline = time.time() + timeout_s
    while True:
        state = subprocess.run(state_command(args), capture_output=True, text=True,
                               check=True).stdout.strip()
        print(f"queued resource {args.name}: {state}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED") or time.time() > deadline:
            raise SystemExit(f"queued resource {args.name} is {state}; not starting")
        time.sleep(30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--accelerator", required=True, help="e.g. v5p-128, v6e-256, v4-32")
    parser.add_argument("--project", default="")
    parser.add_argument("--runtime_version", default="v2-alpha-tpuv5")
    parser.add_argument("--num_slices", type=int, default=1)
    parser.add_argument("--spot", action="store_true")
    parser.add_argument("--teardown", action="store_true", help="delete the TPUs afterwards")
    parser.add_argument("--archive", default="/tmp/llmjax.tar")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    phases = plan(args, train_args)
    if args.dry_run:
        for cmd in (c for cmds in phases.values() for c in cmds):
            print(shlex.join(cmd))
        return 0

    for cmd in phases["create"]:
        run(cmd)
    wait_active(args)
    for cmd in phases["install"]:
        run(cmd)
    # One ssh per slice, all at once: every worker of every slice must start together.
    procs = [subprocess.Popen(cmd) for cmd in phases["train"]]
    code = max(p.wait() for p in procs)
    for cmd in phases["teardown"]:
        run(cmd)
    return code


if __name__ == "__main__":
    sys.exit(main())
