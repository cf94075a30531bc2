"""MLflow system metrics for a run (``tracking.system_metrics``): CPU, memory, disk, network and, with
nvidia-ml-py, GPU utilisation and memory, logged as ``system/...`` metrics, so a slow run shows why in
the dashboard. Needs psutil (``pip install 'unetlab[gpu]'`` brings psutil and nvidia-ml-py)."""

from __future__ import annotations

import importlib.util
from typing import Any

from unetlab.errors import ConfigError

__all__ = ["start_system_metrics", "system_metrics_enabled"]


def system_metrics_enabled(setting: bool | str, device_type: str) -> bool:
    """Whether a run on ``device_type`` logs system metrics: ``auto`` means on for CUDA when psutil is
    installed; ``true`` without psutil is a configuration error (raised before any run exists)."""
    available = importlib.util.find_spec("psutil") is not None
    if setting is True and not available:
        raise ConfigError("true needs psutil (pip install 'unetlab[gpu]', or set it to auto or false)",
                          "tracking.system_metrics")
    if setting == "auto":
        return device_type == "cuda" and available
    return bool(setting)


def start_system_metrics(run_id: str, tracking_uri: str | None = None, sampling_interval: float = 10.0) -> Any:
    """Start MLflow's monitor for ``run_id`` (a background thread); call ``.finish()`` on the returned
    object when the run ends. Samples every ``sampling_interval`` seconds (MLflow's environment
    variable ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, tracking_uri=tracking_uri)
    monitor.start()
    return monitor
