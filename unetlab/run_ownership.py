"""Which process owns an MLflow run, and whether that process is still alive.

A run that ``unetlab run`` creates carries owner tags: the host, the PID and the PID's start time.
A later invocation on the same host reads them to tell a run whose process is gone (killed by
SIGKILL, out of memory...) from one still training, so the gone one is marked KILLED rather than
left RUNNING. The start time makes a PID reused by another process count as gone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

__all__ = ["OWNER_HOST", "OWNER_PID", "OWNER_STARTED", "owner_alive", "owner_tags", "process_start_time"]

OWNER_HOST, OWNER_PID, OWNER_STARTED = "unetlab.owner.host", "unetlab.owner.pid", "unetlab.owner.started"


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
