#!/usr/bin/env python3
"""Run llmjax.train as several processes on this machine, the way a pod runs it.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \
        --config=configs/shakespeare.py --workdir=runs/two_processes

Each process gets the coordinator address, the process count and its id (through
LLMJAX_* variables read by llmjax.parallel.distributed), and on CPU its own simulated devices.
Output lines are prefixed with [pN]; Gloo's connection messages (CPU collectives) become
one line per process. If one process fails, the others are stopped.
`--dry_run` prints the exact commands instead of running them.
"""

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def commands(args, train_args: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """(extra environment, argv) for each process."""
    port = args.port or free_port()
    out = []
    for pid in range(args.num_processes):
        env = {"LLMJAX_COORDINATOR_ADDRESS": f"localhost:{port}",
               "LLMJAX_NUM_PROCESSES": str(args.num_processes),
               "LLMJAX_PROCESS_ID": str(pid)}
        if args.devices_per_process:
            env["JAX_PLATFORMS"] = "cpu"
            count = "--xla_force_host_platform_device_count"  # the user's other flags stay
            kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
            env["XLA_FLAGS"] = " ".join([*kept, f"{count}={args.devices_per_process}"])
        out.append((env, [args.python, "-m", "llmjax.train", *train_args]))
    return out


# Gloo prints a message per collective context it connects (about 8 for two processes),
# from several threads at once, so the pieces of its messages can interleave within and
# across lines ("[Gloo] Rank [Gloo] Rank 0 is connected to ..."). A line made only of such
# pieces is Gloo's; each process gets one line for all of them.
GLOO_PIECES = re.compile(r"(?:\[Gloo\] Rank |is connected to|peer ranks\.?|Expected number of "
                         r"connected peer ranks is :|\d+|\s+)+")


def is_gloo_connected(line: str) -> bool:
    return ("[Gloo]" in line or "peer ranks" in line) and bool(GLOO_PIECES.fullmatch(line))


def stream(prefix: str, pipe, sink) -> None:
    connected = False
    for line in pipe:
        if is_gloo_connected(line):
            if connected:
                continue
            connected = True
            line = "connected to the other processes (gloo collectives)\n"
        sink.write(f"[{prefix}] {line}")
        sink.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=0,
                        help="simulate this many CPU devices per process (0: real devices)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    plan = commands(args, train_args)
    if args.dry_run:
        for env, cmd in plan:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
        return 0

    procs, threads = [], []
    for pid, (env, cmd) in enumerate(plan):
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        thread = threading.Thread(target=stream, args=(f"p{pid}", proc.stdout, sys.stdout))
        thread.start()
        threads.append(thread)

    def forward(signum, frame):  # a SIGTERM to the launcher reaches every process
        for proc in procs:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    returncode = 0
    remaining = set(range(len(procs)))
    while remaining:
        for i in list(remaining):
            try:
                code = procs[i].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            remaining.discard(i)
            if code != 0 and returncode == 0:
                returncode = code
                print(f"[launcher] process {i} exited with {code}; stopping the others",
                      flush=True)
                for j in remaining:
                    procs[j].terminate()
    for thread in threads:
        thread.join()
    return returncode


if __name__ == "__main__":
    sys.exit(main())
