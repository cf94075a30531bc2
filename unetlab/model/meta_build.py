"""Build every component of a run on the meta device, so ``unetlab validate`` catches factory errors.

A factory may reject a value its type hint allows (``depth: 9`` for an encoder with 8 levels) or fail
on a combination of values; such errors otherwise appear only when ``unetlab run`` trains. Here the
model, the losses, the metrics and the augmentations of every run are built under
``torch.device("meta")``: shapes without memory and without weights, so validating stays quick. The
dataset source is built once per distinct dataset config (its splits are never loaded) for the
``auto`` channels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from unetlab.data.options import source_key
from unetlab.errors import ConfigError, UnetlabError, exception_text
from unetlab.plugin_api.registry import Registry, component_params

__all__ = ["build_runs_on_meta"]


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _create(registry: Registry, kind: str, spec: Mapping[str, Any], where: str, *drop: str, **contract: Any) -> Any:
    try:
        return registry.create(kind, spec["name"], **contract, **component_params(spec, *drop))
    except UnetlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - any error of a plugin's factory is reported as one line
        raise ConfigError(f"cannot build {kind} '{spec['name']}': {exception_text(exc)}", where) from None


def build_run_on_meta(config: Mapping[str, Any], registry: Registry, source: Any) -> None:
    """Build one run's model, losses, metrics and augmentations on the meta device; raise on a factory error.

    ``source`` is the run's dataset source (for ``auto`` channels and the number of classes).
    """
    import torch

    from unetlab.data.sources import model_io
    from unetlab.model.unet import build_unet

    in_channels, out_channels, num_classes = model_io(dict(config), source)
    train = config["train"]
    with torch.device("meta"):
        build_unet(config["model"], in_channels, out_channels, registry, initialise=False, pretrained="check")
        for i, spec in enumerate(train["loss"]):
            _create(registry, "loss", spec, f"train.loss[{i}]", "weight", num_classes=num_classes)
        for i, spec in enumerate(train["metrics"]):
            _create(registry, "metric", spec, f"train.metrics[{i}]", num_classes=num_classes)
        for i, spec in enumerate(config["data"]["augment"]):
            _create(registry, "augmentation", spec, f"data.augment[{i}]")


def build_runs_on_meta(runs: Iterable[Any], registry: Registry, where: str = "") -> None:
    """``build_run_on_meta`` for every run (``Run`` objects), each distinct build once.

    Raises ``UnetlabError`` prefixed with ``where`` (the file) and the run's name:
    ``exp.yaml: run 'base/seed=0': model.upsampler: cannot build upsampler 'x': ValueError: ...``.
    """
    from unetlab.data.sources import build_source  # torch is imported only when there are runs to build

    sources: dict[str, Any] = {}
    built: set[str] = set()
    prefix = f"{where}: " if where else ""
    for run in runs:
        config = run.config
        dataset = source_key(config["data"])  # data.* options configure the source
        build = _key([dataset, config["data"]["augment"], config["model"], config["train"]["loss"],
                      config["train"]["metrics"]])
        if build in built:
            continue
        try:
            if dataset not in sources:
                sources[dataset] = build_source(config, registry)
            build_run_on_meta(config, registry, sources[dataset])
        except UnetlabError as exc:
            raise UnetlabError(f"{prefix}run '{run.name}': {exc}") from None
        built.add(build)
