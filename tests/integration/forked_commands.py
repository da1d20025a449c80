"""Run many command lines in one interpreter: `python forked_commands.py CASES.json OUT.json`.

Importing JAX and the library costs seconds per process; a table of bad inputs would pay
it per case. Here the heavy imports happen once, then each case runs in a fork, as
`python -m MODULE ARGS...` would (runpy, its own stdout/stderr, its exit status). A case
is {"module", "args", "hold_lock": WORKDIR or absent}; the result adds "rc", "stdout",
"stderr" and "seconds". `hold_lock` takes the workdir's lock in the parent first, as a running
`llmjax.train` would.
"""

import json
import os
import runpy
import sys
import tempfile
import time
import traceback

# The repository's llmjax, whatever else is installed (a script's sys.path starts at its
# own directory, `python -m` at the working directory).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))

import jax  # noqa: E402, F401  (before the forks; no backend starts until a case runs)
import ml_collections.config_flags  # noqa: E402, F401

import llmjax.cli  # noqa: E402, F401
import llmjax.training.loop  # noqa: E402, F401
from llmjax import workdir  # noqa: E402


def run_case(case: dict) -> dict:
    start = time.perf_counter()
    out, err = (tempfile.TemporaryFile(mode="w+") for _ in range(2))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: `python -m MODULE ARGS`
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [case["module"], *case["args"]]
        code = 0
        try:
            runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
        except SystemExit as e:  # what the interpreter does with it
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
                code = 1
            else:
                code = e.code or 0
        except BaseException:  # noqa: BLE001 - an uncaught error: its traceback, status 1
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return {**case, "rc": os.waitstatus_to_exitcode(status), "stdout": out.read(),
            "stderr": err.read(), "seconds": time.perf_counter() - start}


def main(cases_path: str, results_path: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        if case.get("hold_lock"):
            with workdir.lock(case["hold_lock"]):
                results.append(run_case(case))
        else:
            results.append(run_case(case))
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
