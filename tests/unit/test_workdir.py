"""One workdir, one run: WORKDIR/lock refuses a second holder, naming the first, and a lock
left by a run that is gone is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from llmjax import workdir


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with workdir.lock(str(tmp_path)):
        record = json.loads((tmp_path / "lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        # flock is per open file: a second open in this process contends like another run
        with pytest.raises(ValueError, match=rf"{tmp_path} is in use by process "
                           rf"{os.getpid()} on {socket.gethostname()} \(since .*\): wait"):
            with workdir.lock(str(tmp_path)):
                pass
    assert (tmp_path / "lock").read_text() == ""  # released: emptied, not removed
    with workdir.lock(str(tmp_path)):  # free again
        pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    # A process that takes the lock and dies without releasing it (as kill -9 would).
    code = ("import os, sys; from llmjax import workdir; "
            f"held = workdir.lock({str(tmp_path)!r}); held.__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    dead = json.loads((tmp_path / "lock").read_text())["pid"]
    with workdir.lock(str(tmp_path)):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert f"Took over the lock of process {dead} on " in capsys.readouterr().out
