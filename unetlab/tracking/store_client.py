"""Access to an MLflow store that survives faults: a server that stops answering and a new sqlite store
created by several processes at once.

* Against a server (``http://``, ``https://``) every client call is retried while the server does not
  answer, for at most ``UNETLAB_TRACKING_TIMEOUT`` seconds (default 300) in all, then fails with
  ``TrackingUnavailable``: one line naming the server and saying how to resume. MLflow's own retry
  loop (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with exponential backoff) is switched off
  unless the user set it, so the budget is ours and the waits are plain ``time.sleep`` calls that a
  signal interrupts.
* Retrying must not do a thing twice. Most calls are idempotent (tags and final statuses are set again,
  a metric or param logged again with the same value is skipped by the server, experiment names are
  unique). ``create_run`` is not: a create the server performed but answered too late would leave a
  second run. Each remote create carries a ``unetlab.create_token`` tag, and a retry first looks for a
  run with that token.
* Creating the schema of a new sqlite store is not safe across processes (two processes both see an
  empty file and both run the migrations: "duplicate column name: step"). ``store_creation_lock``
  holds a file lock beside the database while a process opens it for the first time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from unetlab.errors import UnetlabError
from unetlab.tracking import tags as run_tags

__all__ = ["CREATE_TOKEN_TAG", "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "BoundedClient", "TrackingUnavailable",
           "configure_mlflow_http", "is_remote", "sqlite_path", "store_creation_lock", "tracking_timeout"]

TIMEOUT_ENV = "UNETLAB_TRACKING_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_FIRST_WAIT_S, _LONGEST_WAIT_S = 0.25, 5.0
CREATE_TOKEN_TAG = run_tags.CREATE_TOKEN

T = TypeVar("T")


class TrackingUnavailable(UnetlabError):
    """The MLflow tracking server did not answer for ``UNETLAB_TRACKING_TIMEOUT`` seconds."""


def tracking_timeout() -> float:
    """Seconds to keep retrying an unreachable tracking server: ``UNETLAB_TRACKING_TIMEOUT`` or 300."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UnetlabError(f"{TIMEOUT_ENV}={text!r}: must be a positive number of seconds")
    return value


def is_remote(uri: str | None) -> bool:
    """Whether ``uri`` names a tracking server reached over HTTP."""
    return bool(uri) and str(uri).lower().startswith(("http://", "https://"))


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) means the server did not answer or answered 5xx.

    MLflow wraps the ``requests`` error in an ``MlflowException`` ("API request to ... failed with
    exception ..."); the original is its ``__cause__`` or ``__context__``.
    """
    import requests
    import urllib3

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
             requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class BoundedClient:
    """An ``MlflowClient`` whose calls wait out a server outage for at most ``timeout`` seconds.

    Any attribute of the wrapped client is available; its methods are wrapped by ``call``. Against a
    local store (sqlite, files) calls go straight through.
    """

    def __init__(self, client: Any, uri: str, timeout: float, resume_hint: str) -> None:
        self.client = client
        self.uri = uri
        self.timeout = timeout
        self.resume_hint = resume_hint
        self.retrying = is_remote(uri)
        self._down = False  # set once the budget is spent: later calls try once, they do not wait again

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            return self.call(attr, *args, **kwargs)

        return bounded

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried while the server is unreachable, within the time budget.

        For idempotent calls only (see the module docstring). No retries (one attempt) after
        ``fail_fast``-style ``retrying = False``, once the budget has been spent, or while an interrupt is
        being handled: marking runs KILLED after Ctrl-C or SIGTERM must not wait out a dead server.
        """
        if not is_remote(self.uri):
            return fn(*args, **kwargs)
        retry = self.retrying and not self._down and not isinstance(sys.exc_info()[1], KeyboardInterrupt)
        deadline = time.monotonic() + self.timeout
        wait = _FIRST_WAIT_S
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not _unreachable(exc):
                    raise
                remaining = deadline - time.monotonic()
                if not retry or remaining <= 0:
                    self._down = True
                    raise TrackingUnavailable(self.unavailable_message()) from None
                time.sleep(min(wait, remaining))  # a signal interrupts this: the handler's exception propagates
                wait = min(2 * wait, _LONGEST_WAIT_S)
                continue
            self._down = False
            return result

    def create_run(self, experiment_id: str, start_time: int | None = None, tags: dict[str, str] | None = None,
                   run_name: str | None = None) -> Any:
        """``MlflowClient.create_run`` that creates one run however often it is retried.

        Against a server the run is tagged ``unetlab.create_token`` (a fresh uuid); before each retry the
        experiment is searched for that token, and a run the server created but answered too late for is
        returned instead of a second one.
        """
        if not is_remote(self.uri):
            return self.client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)
        token = uuid.uuid4().hex
        tags = {**(tags or {}), CREATE_TOKEN_TAG: token}
        attempts = 0

        def create_once() -> Any:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                found = self.client.search_runs([experiment_id], max_results=1,
                                                filter_string=f"tags.`{CREATE_TOKEN_TAG}` = '{token}'")
                if found:
                    return found[0]
            return self.client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)

        return self.call(create_once)

    def unavailable_message(self) -> str:
        """The one line a user sees when the server is gone."""
        return (f"the MLflow tracking server {self.uri} is unreachable (no answer for {self.timeout:g} s, "
                f"set by {TIMEOUT_ENV}); the last checkpoint is kept: '{self.resume_hint}' continues from it")


def configure_mlflow_http(timeout: float) -> None:
    """Hand retrying to ``BoundedClient``: no MLflow retry loop of its own.

    A request the server accepted but does not answer is abandoned after the budget, but never before
    30 s (a busy server is slow, not gone) nor after MLflow's 120 s. Variables the user set are left alone.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(min(120, max(30, timeout)))))


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory databases)."""
    if not uri or not str(uri).startswith("sqlite:///"):
        return None
    rest = str(uri)[len("sqlite:///"):].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


@contextlib.contextmanager
def store_creation_lock(uri: str | None) -> Iterator[None]:
    """Hold a lock file beside a sqlite database (``.NAME.lock``) so only one process creates its schema.

    Other stores need no lock (a server serialises itself). The lock is an OS-level lock: it is
    released when its holder exits, however it exits.
    """
    path = sqlite_path(uri)
    if path is None or not path.parent.is_dir():
        yield
        return
    from filelock import FileLock

    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        yield
