"""Checking a run before anything is written: data, channels, sizes, the monitored metric, and the
one resolution of where and how it trains (device, precision, memory format).

``unetlab run`` prepares every run before it creates an MLflow run, so bad input is one line and
leaves nothing behind; ``unetlab summary`` reuses the same checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from unetlab.config.experiment import Run
from unetlab.config.settings import RunSettings
from unetlab.data.options import source_key
from unetlab.data.sources import build_augment, build_source, model_io
from unetlab.errors import ConfigError, UnetlabError, did_you_mean
from unetlab.plugin_api.contracts import image_size_of
from unetlab.plugin_api.metric_ranges import metric_ranges
from unetlab.plugin_api.registry import Registry, metric_directions, resolve_monitor_mode
from unetlab.training.system_metrics import system_metrics_enabled

if TYPE_CHECKING:
    from unetlab.model.unet import PretrainedMode

__all__ = ["ModelCheck", "Prepared", "Runtime", "check_model", "check_processes_per_node", "config_hash", "dataset_key",
           "model_cost", "monitor_keys", "prepare", "prepare_all", "resolve_device", "resolve_runtime", "training_size"]

DEFAULT_SIZE = (64, 64)  # the size models are checked at when a dataset does not say its own


def config_hash(config: dict) -> str:
    """A stable hash of a resolved config: the identity of a run for --resume and checkpoints."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Runtime:
    """Where and how a run trains, resolved once from its ``train`` and ``data`` sections."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None: full precision
    channels_last: bool
    pin_memory: bool
    system_metrics: bool = False  # MLflow system metrics for this run (tracking.system_metrics)


@dataclass
class Prepared:
    """A run checked and ready to train: its data source, channels, runtime, size and cost."""

    run: Run
    source: Any
    in_channels: int
    out_channels: int
    num_classes: int
    runtime: Runtime
    params: int
    gflops: float
    key: str  # "<run name>@<config hash>": how --resume finds the run again
    metric_directions: dict[str, str] = field(default_factory=dict)  # logged key -> "max"/"min"
    metric_ranges: dict[str, list] = field(default_factory=dict)  # logged key -> declared [low, high]


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(spec: str) -> torch.device:
    """``auto``: cuda, then mps, then cpu; otherwise the named device, which must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"'{spec}' is not a device (auto, cpu, cuda, cuda:N, mps)", "train.device") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"'{spec}' asked for, but no CUDA device is available (use auto or cpu)",
                              "train.device")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"'{spec}' asked for, but only {count} CUDA device(s) are visible", "train.device")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(f"'{spec}' asked for, but MPS is not available (use auto or cpu)", "train.device")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"'{spec}' is not supported (auto, cpu, cuda, cuda:N, mps)", "train.device")
    return device


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError(f"fp16 needs a CUDA device, and this run trains on {device.type} (use bf16 or off)",
                          "train.amp")
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def resolve_runtime(config: dict, world_size: int = 1) -> Runtime:
    """Device, autocast dtype and memory format of a resolved run config, for a job of ``world_size``
    processes; every combination that cannot train is a ``ConfigError`` here, before anything is written."""
    settings = RunSettings.from_config(config)
    train = settings.train
    device = resolve_device(train.device)
    if train.sync_batchnorm and (device.type != "cuda" or world_size < 2):
        raise ConfigError("true needs CUDA and several processes (--nproc-per-node N); this run has "
                          f"{world_size} process(es) on {device.type} (set it to false)", "train.sync_batchnorm")
    cuda = device.type == "cuda"
    pin = settings.data.pin_memory
    return Runtime(device=device, amp_dtype=_amp_dtype(train.amp, device),
                   channels_last=train.channels_last is True or (train.channels_last == "auto" and cuda),
                   pin_memory=pin is True or (pin == "auto" and cuda),
                   system_metrics=system_metrics_enabled(settings.tracking.system_metrics, device.type))


def monitor_keys(config: dict, num_classes: int, registry: Registry) -> list[str]:
    """Every metric key a run logs per validation (what ``train.monitor`` may name)."""
    return list(metric_directions(config["train"], num_classes, registry))


def training_size(config: dict, registry: Registry, in_channels: int, size: tuple[int, int]) -> tuple[int, int]:
    """The image size the model sees in training: the configured augmentations run once on a blank batch
    (an augmentation that crops or resizes changes it; the core needs no list of which ones do)."""
    augment = build_augment(config, registry)
    if augment is None:
        return size
    generator = torch.Generator()
    generator.manual_seed(0)
    try:
        images, _ = augment(torch.zeros(1, in_channels, *size), torch.zeros(1, *size, dtype=torch.long), generator)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"the augmentations cannot run on {size[0]}x{size[1]} images: {exc}",
                          "data.augment") from None
    return int(images.shape[-2]), int(images.shape[-1])


@dataclass
class ModelCheck:
    """A run's data source, resolved channels and built model (``unetlab summary`` stops here)."""

    source: Any
    in_channels: int
    out_channels: int
    num_classes: int
    model: Any
    image_size: tuple[int, int]  # the dataset's (or DEFAULT_SIZE when it does not say)


def check_model(run: Run, registry: Registry, source: Any = None, pretrained: PretrainedMode = "check") -> ModelCheck:
    """Build the run's dataset source (unless given: runs with the same dataset config share one) and its
    model; bad data, channels or component parameters raise ``UnetlabError`` here. ``pretrained``: what a
    pretrained component does (``unetlab.model.unet.pretrained_mode``): ``check`` that its weights are there, or
    ``skip`` under ``--resume``, whose runs load their own checkpoint."""
    from unetlab.model.unet import build_unet

    if source is None:
        source = build_source(run.config, registry)
        for split in ("train", "val"):  # data problems (bad masks, sizes) surface now, before MLflow
            source.split(split)
    in_ch, out_ch, num_classes = model_io(run.config, source)
    model = build_unet(run.config["model"], in_ch, out_ch, registry, pretrained=pretrained)  # counted, not trained
    # HasImageSize's contract: a source's image size is (H, W)
    size = cast("tuple[int, int]", image_size_of(source) or tuple(DEFAULT_SIZE))
    return ModelCheck(source, in_ch, out_ch, num_classes, model, size)


def model_cost(config: dict, registry: Registry, checked: ModelCheck) -> tuple[int, float]:
    """(trainable parameters, forward GFLOPs for one image at the training size) of a checked model: what a
    run logs as ``model.num_params`` and ``model.gflops_per_image`` and the comparison contract shows."""
    from unetlab.model.unet import count_parameters, forward_flops

    size = training_size(config, registry, checked.in_channels, checked.image_size)
    return count_parameters(checked.model), forward_flops(checked.model, checked.in_channels, *size) / 1e9


def prepare(run: Run, registry: Registry, world_size: int = 1, source: Any = None,
            pretrained: PretrainedMode = "check") -> Prepared:
    """Everything that can be checked before training: runtime, data, channels, sizes, the monitored metric.

    ``source``: an already built dataset source for this run's dataset config (shared between runs).
    ``pretrained``: as for ``check_model``.
    """
    from unetlab.model.unet import output_shape

    try:
        runtime = resolve_runtime(run.config, world_size)
        checked = check_model(run, registry, source, pretrained)
        source, in_ch, out_ch, num_classes, model = (checked.source, checked.in_channels, checked.out_channels,
                                                     checked.num_classes, checked.model)
        size = training_size(run.config, registry, in_ch, checked.image_size)
        output_shape(model, in_ch, *size)
        params, gflops = model_cost(run.config, registry, checked)
        directions = metric_directions(run.config["train"], num_classes, registry)
        ranges = metric_ranges(run.config["train"], num_classes, registry)
        keys = list(directions)
    except UnetlabError as exc:
        raise UnetlabError(f"run '{run.name}': {exc}") from None
    monitor = run.config["train"]["monitor"]
    if monitor not in keys:
        raise ConfigError(f"run '{run.name}': train.monitor: '{monitor}' is not logged by this run"
                          f"{did_you_mean(monitor, keys)} (logged: {', '.join(keys)})")
    # monitor_mode 'auto' becomes the monitored key's declared direction, recorded in the config that runs
    run.config["train"]["monitor_mode"] = resolve_monitor_mode(run.config["train"], directions)
    return Prepared(run, source, in_ch, out_ch, num_classes, runtime, params, gflops,
                    f"{run.name}@{config_hash(run.config)}", directions, ranges)


def prepare_all(runs: Sequence[Run], registry: Registry, world_size: int = 1,
                pretrained: PretrainedMode = "check") -> list[Prepared]:
    """``prepare`` every run; runs with the same dataset config share one source (one copy in memory)."""
    sources: dict[str, Any] = {}
    prepared = []
    for run in runs:
        prep = prepare(run, registry, world_size, sources.get(dataset_key(run.config)), pretrained)
        sources.setdefault(dataset_key(run.config), prep.source)
        prepared.append(prep)
    return prepared


def check_processes_per_node(runs: Sequence[Run], nproc: int) -> None:
    """``--nproc-per-node N``, checked before torchrun starts: each run's runtime with N processes, and on
    CUDA one visible GPU per process (no fallback: CPU processes are asked for with ``train.device=cpu``)."""
    for run in runs:
        try:
            runtime = resolve_runtime(run.config, nproc)
        except UnetlabError as exc:
            raise UnetlabError(f"run '{run.name}': {exc}") from None
        visible = torch.cuda.device_count() if runtime.device.type == "cuda" else nproc
        if visible < nproc:
            raise UnetlabError(f"--nproc-per-node {nproc}: only {visible} CUDA device(s) are visible and each "
                               f"process needs its own; use --nproc-per-node {visible}, or train.device=cpu for "
                               f"{nproc} CPU processes (gloo)")


def dataset_key(config: dict) -> str:
    """Runs that build the same source get the same key (and share one source): the dataset and the
    data.* options that configure it (``data.fold``, patches, ...), never the loader-only keys."""
    return source_key(config["data"])
