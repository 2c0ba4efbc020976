"""safe_io.py: atomic writes that report any failure with the path and free space, and exclusive claims."""
import json
import os
import socket
import subprocess
import sys

import pytest

from safe_io import Claim, ClaimError, WriteError, atomic_write, check_writable, owner_is_gone, temporary_name


def finished_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_lock(path, **owner):
    path.write_text(json.dumps({"host": socket.gethostname(), "since": "earlier", "command": "train.py", **owner}))


def test_temporary_names_differ_per_call():
    names = {temporary_name("/x/out.npz") for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("/x/out.npz.tmp.") and str(os.getpid()) in n for n in names)


def test_any_write_exception_becomes_a_write_error_with_path_and_free_space(tmp_path):
    def fails(tmp):
        open(tmp, "wb").close()
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")  # torch.save's
    with pytest.raises(WriteError, match=r"could not write checkpoint .*4\.pt \(RuntimeError: PytorchStream.*"
                                         r"\); \d+\.\d\d GiB free on its file system"):
        atomic_write(str(tmp_path / "4.pt"), fails, "checkpoint")
    assert os.listdir(tmp_path) == []  # no temporary file left
    # a folder that cannot exist (under a file) fails the same way, naming the path
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="could not write file .*file/sub/a.txt .*GiB free"):
        atomic_write(str(tmp_path / "file" / "sub" / "a.txt"), lambda tmp: open(tmp, "w").close())
    with pytest.raises(WriteError, match="could not write results folder"):
        check_writable(str(tmp_path / "file" / "sub"), "results folder")
    check_writable(str(tmp_path / "ok"))
    assert os.listdir(tmp_path / "ok") == []


def test_claim_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    lock = tmp_path / "out.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(lock, pid=sleeper.pid)
        with pytest.raises(ClaimError, match=rf"in use by another process: pid {sleeper.pid} on this host .*"
                                             rf"train\.py.*use another --out; it is still running"):
            Claim(lock, "out.npz", "sample dump", "another --out").acquire()
        assert json.loads(lock.read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same pid, now gone: stale, taken over, and noted
    claim = Claim(lock, "out.npz", "sample dump")
    assert "took over the stale lock" in claim.acquire() and json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(ClaimError):  # held by this live process now
        Claim(lock, "out.npz", "sample dump").acquire()
    claim.release()
    assert not lock.exists()


def test_other_hosts_and_reused_pids(tmp_path):
    assert not owner_is_gone({"host": "elsewhere", "pid": finished_pid()})  # cannot be told: refused
    assert owner_is_gone({"host": socket.gethostname(), "pid": finished_pid()})
    assert owner_is_gone({"host": socket.gethostname(), "pid": os.getpid(), "start": -1})  # pid reused
    lock = tmp_path / "w.lock"
    write_lock(lock, host="node17", pid=123)
    with pytest.raises(ClaimError, match=r"pid 123 on host node17 .*cannot tell whether it still runs; if it does "
                                         rf"not, delete {lock} and re-run"):
        Claim(lock, "run", "working_dir").acquire()
