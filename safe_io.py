"""Safe output for every script: unique temporary names, atomic writes, write checks before long work, write
failures that name the path and the free space, and exclusive claims on an output (a lock file naming the host
and process that holds it).

No torch import: the evaluator uses it as well as the training and sampling scripts.

A claim is a lock file created with O_EXCL. Its owner is written into it (host, pid, the process's start time and
boot id, the command). A lock whose owner is gone (same host, and the pid is not running or belongs to a process
started later) is stale and taken over; any other lock is refused with a message naming the owner and how to
clear the lock when that owner is known to be gone.
"""
import json
import os
import secrets
import shutil
import socket
import sys
import time


class OutputError(RuntimeError):
    """An output that was not written; the message says which and why."""


class WriteError(OutputError):
    """A file that could not be written; the message names the file, the cause and the free space."""

    def __init__(self, path, cause, what="file"):
        self.path, self.cause = str(path), cause
        super().__init__(f"could not write {what} {path} ({type(cause).__name__}: {cause}); {free_space(path)}")


class ClaimError(OutputError):
    """An output that another live process holds; the message names it and how to clear the claim."""


def temporary_name(path):
    """A name beside `path` that no other process (on any host sharing the folder) picks at the same time."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def free_space(path):
    """'N GiB free on its file system' for the file system of `path` (its nearest existing folder)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 30:.2f} GiB free on its file system"
    except OSError as e:
        return f"free space unknown ({e})"


def atomic_write(path, write, what="file", before_rename=None, content_errors=()):
    """`write(tmp)` writes a temporary file beside `path`; it is fsynced and renamed onto `path`, then the folder
    is fsynced, so a crash leaves the previous file or the complete new one. Any exception of the write (torch.save
    raises RuntimeError, not OSError, on a full or read-only disk) becomes a WriteError naming `path`; interrupts
    (KeyboardInterrupt, SystemExit) and the `content_errors` types (what `write` raises about the content it
    checks, e.g. a failed verification or a bad download) pass unchanged. The temporary file never outlives the
    call. `before_rename(tmp)` is a hook for crash tests."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temporary_name(path)
    try:
        os.makedirs(directory, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except content_errors:
        raise
    except Exception as e:
        raise WriteError(path, e, what) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(folder, what="folder"):
    """Creates `folder` if needed and a probe file in it (removed again); raises WriteError naming the folder
    when that fails. For a check before long work whose result is written at the end."""
    probe = temporary_name(os.path.join(folder, ".write_check"))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except Exception as e:
        raise WriteError(folder, e, what) from e


# ----------------------------------------------------------------------------------------------------
# Claims


def _process_start(pid):
    """The start time of `pid` in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _owner():
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "boot": _boot_id(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}


def owner_is_gone(owner):
    """True when the owner of a lock is known not to run: same host, and its pid does not run, or runs a process
    started at another time (a reused pid), or the machine has rebooted since. False when it runs or cannot be
    told (another host)."""
    if owner.get("host") != socket.gethostname():
        return False
    if owner.get("boot") and _boot_id() and owner["boot"] != _boot_id():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # runs, under another user
    start = _process_start(pid)
    return owner.get("start") is not None and start is not None and start != owner["start"]


class Claim:
    """An exclusive claim on `target` through the lock file `lock_path`. `acquire()` returns a note when it took
    over a stale lock (None otherwise) and raises ClaimError when another process holds it; `release()` removes
    the lock if it is still this process's."""

    def __init__(self, lock_path, target, what, instead=None):
        self.lock_path, self.target, self.what = str(lock_path), str(target), what
        self.instead = instead or f"another {what}"
        self.owner = None

    def _create(self, owner):
        fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
            f.flush()
            os.fsync(f.fileno())

    def _read(self):
        try:
            with open(self.lock_path) as f:
                text = f.read()
        except FileNotFoundError:
            return None, None
        try:
            owner = json.loads(text)
        except ValueError:
            owner = {}
        return text, owner if isinstance(owner, dict) else {}

    def acquire(self):
        owner = _owner()
        note = None
        for _ in range(3):
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.lock_path)), exist_ok=True)
                self._create(owner)
                self.owner = owner
                return note
            except FileExistsError:
                pass
            except OSError as e:  # a read-only or full folder: said before any work, with the path
                raise WriteError(self.lock_path, e, "lock file") from e
            text, held = self._read()
            if text is None:
                continue  # released meanwhile
            if not held or not owner_is_gone(held):
                raise ClaimError(self._refusal(held))
            if self._read()[0] == text:  # still the same stale lock: remove it, then create ours
                os.remove(self.lock_path)
            note = (f"took over the stale lock {self.lock_path} of pid {held.get('pid')} on {held.get('host')} "
                    f"(since {held.get('since')}), which no longer runs")
        raise ClaimError(f"could not claim {self.target}: {self.lock_path} keeps changing; another process is "
                         f"claiming it")

    def _refusal(self, held):
        if not held:
            return (f"{self.what} {self.target} is locked by {self.lock_path}, whose content is unreadable; if no "
                    f"other process writes {self.target}, delete {self.lock_path} and re-run")
        where = "this host" if held.get("host") == socket.gethostname() else f"host {held.get('host')}"
        clear = ("it is still running" if where == "this host" else
                 f"this host cannot tell whether it still runs; if it does not, delete {self.lock_path} and re-run")
        return (f"{self.what} {self.target} is in use by another process: pid {held.get('pid')} on {where} since "
                f"{held.get('since')} (`{held.get('command')}`). Wait for it to finish or stop it, or use "
                f"{self.instead}; {clear}")

    def release(self):
        if self.owner is None:
            return
        _, held = self._read()
        if held is not None and held.get("pid") == self.owner["pid"] and held.get("host") == self.owner["host"]:
            try:
                os.remove(self.lock_path)
            except FileNotFoundError:
                pass
        self.owner = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
