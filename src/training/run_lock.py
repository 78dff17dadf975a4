"""One process per run dir: `<run_dir>/run.lock` holds an exclusive flock and names its holder.

A second process on the same run dir (a re-submitted job, the same command typed twice) fails within
seconds naming the holder's host and PID, instead of interleaving steps in one record. The kernel drops
the lock when its holder dies (even by kill -9), so a lock left by a dead process is simply taken over.
`dead_holder` tells readers (the analysis) that a record still saying "running" has no process behind it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunDirLocked(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            try:
                who = json.loads(holder)
                who = f"PID {who['pid']} on {who['host']} (since {who['since']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise RunDirLocked(
                f"{self.path.parent} is in use by {who}: wait for that run to end or choose another run_name"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            # the file stays: unlinking it would let a process that opened the old inode and one that creates a
            # new file both hold "the" lock
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def dead_holder(run_dir: Path) -> str | None:
    """The lock's last holder, if it was a process on this machine that no longer exists (it died without a
    word: kill -9, the OOM killer); None if it lives, ran on another host, or is not known. Reads the holder
    file only: taking the lock to probe it would make a run starting at that moment fail."""
    try:
        who = json.loads((run_dir / LOCK_FILE).read_text())
        host, pid = who["host"], int(who["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return f"PID {pid} on {host}, since {who.get('since', '?')}"
    except PermissionError:  # it exists, as another user's
        pass
    return None
