"""Multi-host start-up and preemption: JAX's own runtime, nothing of ours in between.

`initialize` connects the processes of a run (`jax.distributed.initialize`):
automatically on Cloud TPU pods and under Slurm, explicitly (coordinator address,
process count and id, from flags or LLMJAX_* variables) for local multi-process runs.
`Preemption` tells the train loop when to save and stop: on SIGTERM, and on TPU
maintenance events through JAX's preemption sync point, at a step every process agrees on.
"""

import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

ENV_COORDINATOR = "LLMJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "LLMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLMJAX_PROCESS_ID"


def _on_cluster() -> bool:
    """A TPU pod slice of several hosts, or a Slurm job of several tasks."""
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in tpu_hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
    """Connect this process to the others of the run (a no-op for a single process).

    Must run before anything touches a JAX device.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
    num_processes = num_processes or int(os.environ.get(ENV_NUM_PROCESSES, "0"))
    if process_id < 0:
        process_id = int(os.environ.get(ENV_PROCESS_ID, "-1"))
    if coordinator_address:
        if num_processes <= 0 or not 0 <= process_id < num_processes:
            raise ValueError(f"--coordinator_address={coordinator_address} needs "
                             f"--num_processes (got {num_processes}) and --process_id in "
                             f"[0, num_processes) (got {process_id})")
        # CPU devices exchange collectives over gloo (GPUs and TPUs ignore this setting).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _on_cluster():
        jax.distributed.initialize()  # addresses come from the TPU metadata or Slurm
    else:
        return
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


class Preemption:
    """`should_stop(step)` is True once every process should checkpoint `step` and exit.

    Several processes: JAX's coordination service turns a SIGTERM (or a TPU maintenance
    notice) on any host into one agreed step for all of them. A single process: our own
    SIGTERM handler, checked at the next step boundary, installed for the `with` block
    only: after training, SIGTERM means "stop" again (worker processes forked later, e.g.
    by llmjax.data.prepare in the same interpreter, must still die when their pool ends).
    """

    def __init__(self):
        self._received = threading.Event()
        self._multi_process = jax.process_count() > 1
        self._previous = None

    def __enter__(self) -> "Preemption":
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._received.set()

    def should_stop(self, step: int) -> bool:
        if self._multi_process:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is off
                return False
        return self._received.is_set()
