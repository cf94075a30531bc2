"""``unetlab summary``: what each run's model costs (parameters, forward GFLOPs) and what it outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unetlab.config.experiment import load_experiment
from unetlab.plugin_api.host import default_host

__all__ = ["summarise_experiment"]


def summarise_experiment(path: str | Path, overrides: Sequence[str] = (),
                         input_size: Sequence[int] | None = None) -> list[dict]:
    """One row per run: run, params, gflops (forward, one image), input_shape and output_shape (C, H, W)."""
    from unetlab.model.unet import count_parameters, forward_flops, output_shape
    from unetlab.training.preflight import check_model, dataset_key

    host = default_host()
    experiment = load_experiment(path, overrides, host=host)
    rows: list[dict] = []
    sources: dict[str, Any] = {}  # dataset key -> its built source, shared by the runs with that key
    for run in experiment.runs:
        checked = check_model(run, host.registry, sources.get(dataset_key(run.config)))
        sources.setdefault(dataset_key(run.config), checked.source)
        in_ch, model = checked.in_channels, checked.model
        height, width = input_size or checked.image_size
        out_shape = output_shape(model, in_ch, height, width)  # first: a size too small is one line here
        rows.append({"run": run.name, "params": count_parameters(model),
                     "gflops": forward_flops(model, in_ch, height, width) / 1e9,
                     "input_shape": [in_ch, height, width], "output_shape": list(out_shape)})
    return rows
