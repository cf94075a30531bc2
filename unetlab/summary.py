"""``unetlab summary``: what each run's model costs (parameters, forward GFLOPs) and what it outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .data import build_source, model_io
from .experiment import load_experiment
from .model import build_unet, count_parameters, forward_flops, output_shape
from .plugins import default_host

__all__ = ["summarise_experiment"]


def summarise_experiment(path: str | Path, overrides: Sequence[str] = (),
                         input_size: Sequence[int] | None = None) -> list[dict]:
    """One row per run: run, params, gflops (forward, one image), input_shape and output_shape (C, H, W)."""
    host = default_host()
    experiment = load_experiment(path, overrides, host=host)
    rows = []
    for run in experiment.runs:
        source = build_source(run.config, host.registry)
        in_ch, out_ch, _ = model_io(run.config, source)
        height, width = input_size or getattr(source, "image_size", None) or (64, 64)
        model = build_unet(run.config["model"], in_ch, out_ch, host.registry)
        out_shape = output_shape(model, in_ch, height, width)
        rows.append({"run": run.name, "params": count_parameters(model),
                     "gflops": forward_flops(model, in_ch, height, width) / 1e9,
                     "input_shape": [in_ch, height, width], "output_shape": list(out_shape)})
    return rows
