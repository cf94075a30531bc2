"""Which process owns an MLflow run, and whether that process is still alive.

A run that ``unetlab run`` creates carries owner tags: the host, the PID and the PID's start time.
A later invocation on the same host reads them to tell a run whose process is gone (killed by
SIGKILL, out of memory...) from one still training, so the gone one is marked KILLED rather than
left RUNNING. The start time makes a PID reused by another process count as gone.

The process that trains a run also holds an exclusive lock on the run's checkpoint folder
(``claim_run_folder``: ``flock`` on ``owner.lock``, which names the owner). The kernel releases it when the
process ends, however it ends, so a second process can never train the same MLflow run at the same time
(two ``--resume`` of one killed run): the second is refused in one line naming the owner.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from unetlab.errors import UnetlabError
from unetlab.tracking import tags as run_tags

__all__ = ["OWNER_HOST", "OWNER_PID", "OWNER_STARTED", "RunBusy", "RunLock", "claim_run_folder", "describe_owner",
           "live_owner_here", "owner_alive", "owner_tags", "process_start_time"]

OWNER_HOST, OWNER_PID, OWNER_STARTED = run_tags.OWNER_HOST, run_tags.OWNER_PID, run_tags.OWNER_STARTED


def process_start_time(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc), or "" where that cannot be read.
    With the PID it names one process: a PID reused later by another process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the owner of a run: host, PID and the PID's start time."""
    pid = os.getpid()
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(pid), OWNER_STARTED: process_start_time(pid)}


def owner_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process a run's owner tags name may still be running: True for another host (which this
    process cannot see) and for runs without owner tags; False when the PID is gone or reused."""
    if tags.get(OWNER_HOST) != socket.gethostname() or not tags.get(OWNER_PID, "").isdigit():
        return True
    pid = int(tags[OWNER_PID])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    started = tags.get(OWNER_STARTED, "")
    return not started or process_start_time(pid) in ("", started)


class RunBusy(UnetlabError):
    """A run is being trained by another live process: this one must not touch it."""


def describe_owner(tags: Mapping[str, str]) -> str:
    """``pid 123 on host h, started 2026-12-03 18:00:02``: who owns a run, from its owner tags (or a lock file)."""
    started = tags.get(run_tags.OWNER_SINCE) or _started_clock(tags.get(OWNER_STARTED, ""))
    return (f"pid {tags.get(OWNER_PID, '?')} on host {tags.get(OWNER_HOST, '?')}"
            + (f", started {started}" if started else ""))


def _started_clock(ticks: str) -> str:
    """A process start time in clock ticks since boot (``process_start_time``) as local wall-clock time."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        since_start = uptime - int(ticks) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - since_start))


def live_owner_here(tags: Mapping[str, str]) -> bool:
    """Whether a run's owner tags name a live process on this host other than this one (on another host
    nothing can be told from here: the folder lock decides)."""
    return (tags.get(OWNER_HOST) == socket.gethostname() and tags.get(OWNER_PID) != str(os.getpid())
            and tags.get(OWNER_PID, "").isdigit() and owner_alive(tags))


class RunLock:
    """An exclusive lock on a run's checkpoint folder, held by the process that trains the run."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the folder up (the run ended); closing the file releases the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim_run_folder(folder: Path, run_name: str, wait_s: float = 0.0) -> RunLock:
    """Lock ``folder`` (a run's checkpoint folder) for this process, waiting up to ``wait_s`` seconds for
    another holder to let go; raise ``RunBusy`` naming that holder otherwise.

    ``flock`` locks are per open file and released by the kernel when the holder exits, however it exits;
    on a network file system they are as good as its locking (NFS: fcntl locks through the lock manager).
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "owner.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunBusy(f"run '{run_name}' is being trained by {describe_owner(_read_owner(path))} "
                              f"(it holds {path}); not starting it a second time") from None
            time.sleep(0.2)
    owner = {**owner_tags(), run_tags.OWNER_SINCE: time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return RunLock(folder, fd)


def _read_owner(path: Path) -> dict[str, str]:
    """The owner a lock file names (data written by another process: anything unreadable names nobody)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in owner.items()} if isinstance(owner, dict) else {}
