"""MLflow tracking for ``unetlab run``: the store, one parent run per invocation, a nested run per
resolved run, and statuses that are always set explicitly (never left RUNNING).

Uses ``MlflowClient`` rather than the fluent API so that no ``atexit`` hook or ``with`` block decides
a run's status: unetlab sets FINISHED, FAILED or KILLED itself.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetlab.errors import UnetlabError, exception_text
from unetlab.tracking import tags as run_tags
from unetlab.tracking.run_ownership import owner_alive
from unetlab.tracking.store_client import (
    BoundedClient,
    TrackingUnavailable,
    configure_mlflow_http,
    store_creation_lock,
    tracking_timeout,
)
from unetlab.training.dataset_identity import dataset_identity

if TYPE_CHECKING:
    from unetlab.training.preflight import Prepared

__all__ = ["RunTracker", "Tracker", "TrackingUnavailable", "git_commit", "resolve_tracking_uri"]

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3 opens an experiment without a kind on its GenAI overview page; this kind opens the runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def resolve_tracking_uri(config_uri: str | None) -> str | None:
    """``MLFLOW_TRACKING_URI`` if set, else the file's ``tracking.uri``, else None (MLflow's default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or config_uri or None


def git_commit(path: Path) -> str | None:
    """The git commit of the repository holding ``path``, or None outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path if path.is_dir() else path.parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Tracker:
    """The MLflow side of one ``unetlab run`` invocation: experiment, parent run, child runs."""

    def __init__(self, experiment_name: str, tracking_uri: str | None,
                 experiment_file: str | Path | None = None) -> None:
        """Open (creating if needed) the store and the experiment.

        Raises ``TrackingUnavailable`` when a tracking server does not answer within
        ``UNETLAB_TRACKING_TIMEOUT`` seconds, ``UnetlabError`` for any other store problem.
        ``experiment_file`` only makes the resume hint of that message exact.
        """
        import mlflow
        from mlflow.tracking import MlflowClient

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.uri = mlflow.get_tracking_uri()
        timeout = tracking_timeout()
        configure_mlflow_http(timeout)
        hint = f"unetlab run {experiment_file or 'FILE'} --resume"
        try:
            # Several processes (--jobs workers, or two `unetlab run` started at once) may open a new
            # sqlite store together: its schema must be created by one of them only.
            with store_creation_lock(self.uri):
                self.client = BoundedClient(MlflowClient(self.uri), self.uri, timeout, hint)
                existing = self.client.get_experiment_by_name(experiment_name)
                if existing is None:
                    self.experiment_id = self._create_experiment(experiment_name)
                else:
                    self.experiment_id = existing.experiment_id
                    kind = existing.tags.get(EXPERIMENT_KIND_TAG, "")
                    if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
                        self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except UnetlabError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any problem of the store is one line naming it
            raise UnetlabError(f"MLflow tracking store '{self.uri}': {exception_text(exc)}") from None
        self.experiment_name = experiment_name
        self.parent_id: str | None = None

    def _create_experiment(self, name: str) -> str:
        """Create the experiment; if another process created it first (two runs started at once against
        one server), use theirs."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            existing = self.client.get_experiment_by_name(name)
            if existing is None:
                raise
            if not existing.tags.get(EXPERIMENT_KIND_TAG):
                self.client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return existing.experiment_id

    # --- parent ------------------------------------------------------------------------------------

    def start_parent(self, run_name: str, tags: dict[str, str], description: str = "") -> str:
        """Create the invocation's parent run."""
        tags = {**tags, "mlflow.note.content": description} if description else tags
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        return self.parent_id

    def reopen(self, run_id: str) -> None:
        """Mark an existing run RUNNING again (resume)."""
        self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str) -> None:
        """Set a run's final status: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)

    def fail_fast(self) -> None:
        """From now on, try each call once: after an interrupt, marking runs KILLED must not wait out a
        dead server (a call to an unreachable server then raises ``TrackingUnavailable`` at once)."""
        self.client.retrying = False

    # --- lookup for --resume -----------------------------------------------------------------------

    def find_runs(self, tag: str, value: str) -> list:
        """Runs of this experiment whose ``tag`` equals ``value``, newest first."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                                       order_by=["attributes.start_time DESC"], max_results=1000)

    # --- children ----------------------------------------------------------------------------------

    def start_child(self, run_name: str, tags: dict[str, str]) -> RunTracker:
        """Create a nested run under the parent."""
        assert self.parent_id is not None
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={**tags, PARENT_TAG: self.parent_id})
        return RunTracker(self, run.info.run_id)

    def child(self, run_id: str) -> RunTracker:
        """Wrap an existing run (resume)."""
        return RunTracker(self, run_id)

    def reap_orphans(self) -> list[str]:
        """Mark KILLED every RUNNING run of this experiment whose owner process (on this host) is gone, e.g.
        after a SIGKILL; return their ids. ``--resume`` then continues them."""
        reaped = []
        for run in self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           max_results=1000):
            if not owner_alive(run.data.tags):
                self.client.set_tag(run.info.run_id, run_tags.STATUS_REASON, "owner process gone")
                self.end(run.info.run_id, "KILLED")
                reaped.append(run.info.run_id)
        return reaped

    def end_running_children(self, parent_id: str, status: str, reason: str) -> list[str]:
        """End with ``status`` (KILLED, FAILED) every child run of ``parent_id`` still RUNNING, saying why in
        the ``unetlab.status_reason`` tag; return their ids. For the process that owns the parent, once its
        runs have stopped: a run whose process was stopped before it could end it (a killed worker, or a
        signal between creating a run and taking charge of it) is not left RUNNING."""
        ended = []
        for run in self.client.search_runs(
                [self.experiment_id], max_results=10000,
                filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'"):
            self.client.set_tag(run.info.run_id, run_tags.STATUS_REASON, reason)
            self.end(run.info.run_id, status)
            ended.append(run.info.run_id)
        return ended

    def start_prepared_run(self, prepared: Prepared, base_tags: dict[str, str],
                           extra_params: dict[str, Any]) -> RunTracker:
        """Create the nested run of a prepared run (``preflight.Prepared``): its identity as tags, its resolved
        config flattened into params (plus ``extra_params``: versions, world size), and ``config.yaml``."""
        import json

        import torch
        import yaml

        from unetlab import __version__
        from unetlab.training.preflight import config_hash

        run = prepared.run
        identity = dataset_identity(prepared)
        child = self.start_child(run.name, {
            **base_tags, run_tags.RUN_KEY: prepared.key, run_tags.RUN_NAME: run.name,
            run_tags.VARIANT: run.variant, run_tags.SEED: str(run.seed), run_tags.ROLE: run.role, **run.tags,
            run_tags.CONFIG_HASH: config_hash(run.config),
            run_tags.DATA_DIGEST: identity[1],  # what --resume checks the data against
            run_tags.METRIC_DIRECTIONS: json.dumps(prepared.metric_directions, sort_keys=True),
            run_tags.METRIC_RANGES: json.dumps(prepared.metric_ranges, sort_keys=True),
            **{run_tags.matrix_tag(k): v if isinstance(v, str) else json.dumps(v) for k, v in run.matrix.items()}})
        child.log_params({**run.flat(), "model.num_params": prepared.params,
                          "model.gflops_per_image": f"{prepared.gflops:.4f}", run_tags.VERSION: __version__,
                          "torch.version": torch.__version__, "device": str(prepared.runtime.device),
                          "data.num_classes": prepared.num_classes,
                          "model.in_channels_resolved": prepared.in_channels,
                          "model.out_channels_resolved": prepared.out_channels, **extra_params})
        child.log_text(yaml.safe_dump(run.config, sort_keys=False), "config.yaml")
        child.log_dataset(*identity)
        return child


class RunTracker:
    """Logging into one MLflow run; handed to lifecycle hooks as ``tracker``."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params in batches of 100 (MLflow's limit); values are stringified and capped at 6000 chars."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log several metrics at ``step`` in one call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        """Log one metric (for lifecycle hooks)."""
        self.client.log_metric(self.run_id, key, float(value), step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set several tags."""
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` as an artifact."""
        self.client.log_text(self.run_id, text, artifact_file)

    def record_failure(self, message: str, traceback_text: str | None = None) -> None:
        """Say why the run failed: the ``unetlab.error`` tag, and ``error.txt`` with the traceback of an
        unexpected error (the status itself is set by ``Tracker.end``)."""
        self.set_tags({run_tags.ERROR: message})
        if traceback_text:
            self.log_text(traceback_text, "error.txt")

    def log_figure(self, figure, artifact_file: str) -> None:
        """Save a matplotlib figure as a PNG artifact."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_dataset(self, name: str, digest: str, splits: dict[str, int], source: str) -> None:
        """Record the run's dataset as an MLflow dataset input (the runs table's Dataset column).

        ``digest`` identifies the data (runs on different data get different digests; MLflow keeps at
        most 36 characters), ``splits`` maps split names to sizes (stored in the dataset's profile),
        ``source`` says where the data comes from (a folder, or a generator and its parameters).
        """
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(name=name, digest=str(digest)[:36], source_type="unetlab",
                          source=json.dumps({"uri": source}),
                          profile=json.dumps({"num_rows": sum(splits.values()), "splits": dict(splits)}))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT,
                                                                                       "training")])])

    def log_model(self, model, pip_requirements: list[str]) -> str:
        """Log ``model`` with ``mlflow.pytorch.log_model`` (pickle format); return its model URI."""
        # Retried whole: an attempt cut off by an outage leaves a logged model that MLflow marks FAILED,
        # and the run's model is the one the last attempt logged.
        return self.client.call(self._log_model_once, model, pip_requirements)

    def _log_model_once(self, model, pip_requirements: list[str]) -> str:
        import mlflow
        import mlflow.pytorch

        # log_model needs an active fluent run; attach to ours and detach without touching its status.
        with _quiet():
            active = mlflow.start_run(run_id=self.run_id)
            try:
                info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                                pip_requirements=pip_requirements)
            finally:
                mlflow.end_run(status="RUNNING")
                del active
        return info.model_uri


class _quiet:
    """Silence MLflow's own progress chatter on stderr while logging a model."""

    def __enter__(self):
        import contextlib
        import logging

        self._levels = {name: logging.getLogger(name).level for name in ("mlflow",)}
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        self._redirect = contextlib.redirect_stderr(io.StringIO())
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        import logging

        self._redirect.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False
