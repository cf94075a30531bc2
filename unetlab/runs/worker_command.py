"""The command line that trains runs in another process: ``python -m unetlab run FILE ...``.

One home for it, used by every launcher that starts a worker: ``--jobs`` (``unetlab.runs.execution``), ``--ray``
(``unetlab.runs.ray_runs``) and ``--nproc-per-node`` (the CLI, behind torchrun), so a flag added to ``unetlab run``
reaches all of them alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["worker_run_args"]


def worker_run_args(path: str | Path, overrides: Sequence[str], *, resume: bool, output: str | None = None,
                    parent_run_id: str | None = None, run_name: str | None = None,
                    only: Sequence[str] = ()) -> list[str]:
    """The arguments after the Python interpreter that make a process run ``unetlab run path``.

    ``overrides`` are the ``--set`` values, ``output`` is ``"quiet"`` or ``"jsonl"`` (None: the progress bar),
    ``parent_run_id`` / ``run_name`` place the worker's run under an existing parent run, and ``only`` selects
    runs by name (it is last: ``--only`` takes every name that follows it).
    """
    return ["-m", "unetlab", "run", str(path),
            *([f"--{output}"] if output else []),
            *(["--parent-run-id", parent_run_id] if parent_run_id else []),
            *(["--run-name", run_name] if run_name else []),
            *[a for s in overrides for a in ("--set", s)],
            *(["--resume"] if resume else []),
            *(["--only", *only] if only else [])]
