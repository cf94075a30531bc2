"""Train one prepared run. Reads top to bottom: set up, restore, then one loop over epochs, each a
``_train_epoch`` and, when due, a ``_validate``.

Reproducibility and resume rest on one rule: everything random in an epoch (shuffling, augmentation,
dropout) is seeded from (run seed, epoch). An epoch is then a pure function of the state at its
start, so resuming from the checkpoint written at an epoch's end reproduces an uninterrupted run
exactly on CPU. The state that changes from epoch to epoch is one ``TrainState``; a 'last'
checkpoint is that state plus the model's, optimiser's, schedule's and scaler's state dicts.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unetlab.checkpoint import load_checkpoint, save_atomic
from unetlab.config.settings import TrainSettings
from unetlab.data.sources import build_augment, make_batches
from unetlab.errors import UnetlabError
from unetlab.model.deep_supervision import deep_supervision_loss
from unetlab.model.unet import UNet, build_unet, crop_target
from unetlab.plugin_api.contracts import ignore_index_of, validates_whole_images
from unetlab.plugin_api.registry import Registry, component_params
from unetlab.training.determinism import configure
from unetlab.training.distributed import DistContext
from unetlab.training.lr_schedule import Schedule, is_better
from unetlab.training.model_store import model_identity
from unetlab.training.peak_memory import start_peak_memory

if TYPE_CHECKING:  # preflight uses build_metrics from here
    from unetlab.training.preflight import Prepared

__all__ = ["RunFailed", "RunResult", "TrainSetup", "TrainState", "build_loss", "build_metrics",
           "epoch_seed", "evaluate", "make_optimizer", "mark_finished", "predict_logits", "train_run"]


class RunFailed(Exception):
    """Training of one run cannot go on (non-finite loss...); the run is marked FAILED."""


@dataclass
class RunResult:
    """How a run ended and what it reached."""

    status: str
    epochs: int = 0
    steps: int = 0
    final: dict[str, float] = field(default_factory=dict)
    best: float | None = None
    best_epoch: int | None = None
    seconds: float = 0.0
    message: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    model: Any = None
    peak_memory_mb: float | None = None      # unetlab.training.peak_memory: what it measures is memory_kind
    memory_kind: str = ""


@dataclass
class TrainSetup:
    """Everything ``train_run`` needs besides the prepared run: where to write, whom to tell, where to resume."""

    prepared: Prepared
    registry: Registry
    checkpoint_dir: Path
    tracker: Any = None                      # RunTracker or None
    on_progress: Callable[..., None] = lambda **kw: None
    lifecycle: Callable[..., None] = lambda hook, **kw: None
    resume: dict | None = None               # a loaded 'last' checkpoint
    dist: DistContext = field(default_factory=DistContext)
    # after each validation: (epoch, optimiser steps, the epoch's record) -> why to stop now, or "" (a pruner)
    stop_check: Callable[[int, int, dict[str, float]], str] | None = None


@dataclass
class TrainState:
    """What changes from epoch to epoch; saved as is (next to the state dicts) in every 'last' checkpoint."""

    epoch: int = 0                 # epochs completed
    step: int = 0                  # optimiser steps taken
    best: float | None = None      # best value of the monitored metric so far
    best_epoch: int | None = None
    stale: int = 0                 # validations since the best one
    history: list[dict[str, float]] = field(default_factory=list)  # one record per epoch

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> TrainState:
        """The state saved in a 'last' checkpoint."""
        return cls(**{f.name: checkpoint[f.name] for f in fields(cls)})


@dataclass
class _Parts:
    """The objects a run trains with, built once by ``_build``."""

    model: UNet                      # build_unet's (SyncBatchNorm conversion keeps the top module)
    forward: Callable                # the model, possibly wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: Any                      # GradScaler for fp16, else None
    loss_fn: Callable
    metrics: list
    augment: Callable | None
    train_loader: Any
    val_loader: Any
    device: torch.device


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in ``epoch`` of a run seeded with ``seed``."""
    return (seed * 1_000_003 + epoch) % 2 ** 63


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _ignoring(kind: str, spec: dict, registry: Registry, ignore_index: int | None, *drop: str) -> dict:
    """A component's parameters, given the dataset's ignore value when it takes ``ignore_index`` and none is set."""
    params = component_params(spec, *drop)
    if ignore_index is not None and params.get("ignore_index") is None \
            and registry.get(kind, spec["name"]).param("ignore_index") is not None:
        params["ignore_index"] = ignore_index
    return params


def build_loss(train: dict, num_classes: int, registry: Registry, ignore_index: int | None = None) -> Callable:
    """The weighted sum of the configured losses; ``ignore_index``: the dataset's (padding, VOC's 255)."""
    parts = [(spec["weight"], registry.create("loss", spec["name"], num_classes=num_classes,
                                              **_ignoring("loss", spec, registry, ignore_index, "weight")))
             for spec in train["loss"]]

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * fn(logits, target) for w, fn in parts)
    return loss


def build_metrics(train: dict, num_classes: int, registry: Registry, ignore_index: int | None = None) -> list:
    """Fresh accumulators for the configured metrics; ``ignore_index``: the dataset's, as for ``build_loss``."""
    return [registry.create("metric", s["name"], num_classes=num_classes,
                            **_ignoring("metric", s, registry, ignore_index)) for s in train["metrics"]]


def make_optimizer(model: torch.nn.Module, train: dict) -> torch.optim.Optimizer:
    """adam, adamw or sgd over the model's trainable parameters.

    With ``train.encoder_lr_mult`` other than 1 the encoder's parameters are a second group whose
    ``lr_mult`` scales the epoch's learning rate (``_train_epoch`` sets each group's lr).
    """
    params: list = [p for p in model.parameters() if p.requires_grad]
    mult = train.get("encoder_lr_mult", 1.0)
    encoder = getattr(model, "encoder", None)
    if mult != 1.0 and encoder is not None:
        in_encoder = {id(p) for p in encoder.parameters()}
        params = [{"params": [p for p in params if id(p) not in in_encoder], "lr_mult": 1.0},
                  {"params": [p for p in params if id(p) in in_encoder], "lr": train["lr"] * mult, "lr_mult": mult}]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"])
    cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    return cls(params, lr=train["lr"], weight_decay=train["weight_decay"])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, loss_fn, metrics, device, dtype, channels_last: bool) -> dict[str, float]:
    """Validation loss (mean over pixels-weighted batches) and every metric over the whole set."""
    model.eval()
    for m in metrics:
        m.reset()
    total, count = torch.zeros((), device=device), 0
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True).long()
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            logits = model(images)
        target = crop_target(masks, logits)
        total += loss_fn(logits, target).float() * images.shape[0]
        count += images.shape[0]
        for m in metrics:
            m.update(logits.float(), target)
    out = {"val_loss": (total / max(count, 1)).item()}
    for m in metrics:
        out.update({f"val_{k}": v for k, v in m.compute().items()})
    return out


def train_run(setup: TrainSetup) -> RunResult:
    """Train one run to its end (epochs, steps, early stopping); raise ``RunFailed`` on a non-finite loss."""
    prep, dist = setup.prepared, setup.dist
    t = TrainSettings.from_config(prep.run.config)
    configure(t.deterministic, prep.runtime.device)  # before the first cuBLAS call (CUBLAS_WORKSPACE_CONFIG)
    _seed_all(t.seed)
    parts = _build(setup)
    state = TrainState()
    if setup.resume is not None:
        state = _restore(parts, setup.resume)
    setup.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        setup.lifecycle("on_run_start", run_name=prep.run.name, config=prep.run.config, model=parts.model,
                        tracker=setup.tracker)

    started, stop_reason = time.perf_counter(), ""
    memory = start_peak_memory(parts.device)
    for epoch in range(state.epoch, t.epochs):
        if t.max_steps is not None and state.step >= t.max_steps:
            break
        epoch_start = time.perf_counter()
        record, stop_reason = _train_epoch(setup, parts, state, epoch)
        if (epoch + 1) % t.val_every == 0 or epoch == t.epochs - 1 or stop_reason:
            record.update(_validate(setup, parts))
            stop_reason = _keep_best(setup, parts, state, record, epoch) or stop_reason
            if setup.stop_check is not None:
                stop_reason = setup.stop_check(epoch + 1, state.step, record) or stop_reason
        record["epoch_time_s"] = time.perf_counter() - epoch_start  # training and validation
        state.epoch = epoch + 1
        state.history.append({"epoch": epoch + 1, **record})
        # Log, then checkpoint: if killed in between, the resumed run repeats this epoch and logs the
        # same values again at the same step (harmless), rather than losing them.
        if setup.tracker is not None:
            setup.tracker.log_metrics(record, step=epoch + 1)
        if dist.is_main:
            setup.lifecycle("on_epoch_end", run_name=prep.run.name, epoch=epoch + 1, metrics=record,
                            model=parts.model, tracker=setup.tracker)
            _save_last(setup, parts, state)
            setup.on_progress(epoch=epoch + 1, record=record)
        if stop_reason:
            break

    _freeze_encoder(parts.model, False)
    best_path = setup.checkpoint_dir / "best.pt"
    if dist.is_main and best_path.exists():  # the model that is logged and compared is the best one
        parts.model.load_state_dict(load_checkpoint(best_path)["model"])
    peak_mb, memory_kind = memory.read()
    return RunResult(status="FINISHED", epochs=len(state.history), steps=state.step,
                     final=state.history[-1] if state.history else {}, best=state.best, best_epoch=state.best_epoch,
                     seconds=time.perf_counter() - started, message=stop_reason, history=state.history,
                     model=parts.model, peak_memory_mb=peak_mb, memory_kind=memory_kind)


def _build(setup: TrainSetup) -> _Parts:
    """Model (on its device, in its memory format), optimiser, schedule, scaler, loss, metrics, data."""
    prep, dist, runtime = setup.prepared, setup.dist, setup.prepared.runtime
    cfg, settings = prep.run.config, prep.run.settings
    t, data = settings.train, settings.data
    device = dist.device(runtime.device)
    # resuming loads the checkpoint's weights next: a pretrained encoder reads no file and no hub
    model = build_unet(cfg["model"], prep.in_channels, prep.out_channels, setup.registry,
                       pretrained="skip" if setup.resume is not None else "load").to(device)
    model.return_auxiliary = settings.model.deep_supervision
    if runtime.channels_last:
        # torch's stubs for Module.to omit its documented memory_format keyword (accepted at run time)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.gradient_checkpointing = t.gradient_checkpointing
    if t.sync_batchnorm:  # preflight allows it only with CUDA and several processes
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, cfg["train"])
    train_set, val_set = prep.source.split("train"), prep.source.split("val")
    if len(train_set) == 0:
        raise UnetlabError(f"run '{prep.run.name}': the training split is empty")
    batch, workers = data.batch_size, data.num_workers
    forward: Callable = model
    if dist.enabled:  # gradients are averaged over ranks: N processes x batch b train like one with batch N*b
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=t.freeze_encoder_epochs > 0)
    if t.compile:  # true or a torch.compile mode (reduce-overhead: CUDA graphs)
        forward = torch.compile(forward, mode=None if t.compile is True else t.compile)
    return _Parts(
        model=model, forward=forward, optimizer=optimizer, schedule=Schedule(cfg["train"]),
        scaler=torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None,
        loss_fn=build_loss(cfg["train"], prep.num_classes, setup.registry, ignore_index_of(prep.source)),
        metrics=build_metrics(cfg["train"], prep.num_classes, setup.registry, ignore_index_of(prep.source)),
        augment=build_augment(cfg, setup.registry),
        # an in-memory split that fits lives on the device (same batches, same order as a DataLoader)
        train_loader=make_batches(train_set, batch, True, workers, runtime.pin_memory, device, dist.rank,
                                  dist.world_size),
        val_loader=make_batches(val_set, data.val_batch_size or batch, False, workers, runtime.pin_memory,
                                device),
        device=device)


def _restore(parts: _Parts, checkpoint: dict) -> TrainState:
    """Load a 'last' checkpoint into the parts; return its training state."""
    parts.model.load_state_dict(checkpoint["model"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.schedule.load_state_dict(checkpoint["schedule"])
    if parts.scaler is not None and checkpoint.get("scaler"):
        parts.scaler.load_state_dict(checkpoint["scaler"])
    return TrainState.from_checkpoint(checkpoint)


def _train_epoch(setup: TrainSetup, parts: _Parts, state: TrainState, epoch: int) -> tuple[dict[str, float], str]:
    """One pass over this rank's shard of the training set; return the epoch's record and why to stop ("" = go on)."""
    prep, dist, device = setup.prepared, setup.dist, parts.device
    t = TrainSettings.from_config(prep.run.config)
    es = epoch_seed(t.seed, epoch)
    rank_seed = es if dist.rank == 0 else (es * 31 + dist.rank) % 2 ** 63  # ranks augment differently
    torch.manual_seed(rank_seed)  # dropout and anything else drawing from the global generator
    generator = torch.Generator(device=device)
    generator.manual_seed(rank_seed)
    lr = parts.schedule.lr(epoch)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    parts.train_loader.epoch_sampler.set_epoch(es)
    parts.model.train()
    _freeze_encoder(parts.model, epoch < t.freeze_encoder_epochs)
    steps_per_epoch = len(parts.train_loader)
    # [the loss optimised, then with deep supervision each output's own loss, finest first]
    outputs = 1 + len(getattr(parts.model, "aux_heads", ())) if parts.model.return_auxiliary else 0
    loss_sum, batches, images_seen, stop_reason = torch.zeros(1 + outputs, device=device), 0, 0, ""
    started = time.perf_counter()
    for images, masks in parts.train_loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True).long()
        if parts.augment is not None:
            images, masks = parts.augment(images, masks, generator)
        if prep.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss_sum += _step(parts, images, masks, prep.runtime.amp_dtype, t.grad_clip)
        batches += 1
        images_seen += images.shape[0]
        state.step += 1
        if state.step % 10 == 0 or batches == steps_per_epoch:  # reading the loss syncs a GPU: not every step
            # every rank sees the same (reduced) value, so all stop together on a non-finite loss
            total = dist.sum(torch.stack([loss_sum[0].float(), torch.full((), float(batches), device=device)]))
            running = _finite((total[0] / total[1]).item(), epoch, state.step)
            setup.on_progress(epoch=epoch + 1, batch=batches, batches=steps_per_epoch, loss=running)
        if t.max_steps is not None and state.step >= t.max_steps:
            stop_reason = f"step budget of {t.max_steps} reached"
            break
    seconds = time.perf_counter() - started
    totals = dist.sum(torch.cat([loss_sum.float(), torch.full((1,), float(batches), device=device),  # a fill, not
                                 torch.full((1,), float(images_seen), device=device)]))      # a host copy
    means = (totals[:-2] / totals[-2].clamp_min(1)).tolist()
    train_loss = _finite(means[0], epoch, state.step)
    record = {"train_loss": train_loss, "lr": lr, "images_per_s": totals[-1].item() / max(seconds, 1e-9)}
    record.update({f"train_loss_level{k}": v for k, v in enumerate(means[1:])})  # deep supervision, finest first
    return record, stop_reason


def _step(parts: _Parts, images: torch.Tensor, masks: torch.Tensor, dtype: torch.dtype | None,
          grad_clip: float | None) -> torch.Tensor:
    """One optimiser step on one batch; return the batch's loss (detached), followed with deep supervision
    by each output's own loss."""
    with _autocast(parts.device, dtype):
        logits = parts.forward(images)
    if isinstance(logits, (list, tuple)):  # deep supervision: the outputs, finest first
        loss, levels = deep_supervision_loss(parts.loss_fn, list(logits), masks, parts.model.padding)
    else:
        loss, levels = parts.loss_fn(logits, crop_target(masks, logits)), None
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is not None:
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
    else:
        loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), grad_clip)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    return loss.detach().reshape(1) if levels is None else torch.cat([loss.detach().reshape(1).float(), levels])


def _freeze_encoder(model: torch.nn.Module, frozen: bool) -> None:
    """Freeze (or free) the encoder's weights; frozen, its BatchNorm layers run in eval mode, so their
    running statistics (a pretrained encoder's) stay as they are and batches are normalised with them."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return
    for p in encoder.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        for m in encoder.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _finite(loss: float, epoch: int, step: int) -> float:
    if not math.isfinite(loss):
        raise RunFailed(f"loss became {loss} at epoch {epoch + 1}, step {step}")
    return loss


def _validate(setup: TrainSetup, parts: _Parts) -> dict[str, float]:
    """Rank 0 validates on the whole set; every rank gets its numbers, so decisions agree."""
    runtime, source = setup.prepared.runtime, setup.prepared.source
    if not setup.dist.is_main:
        val = None
    elif validates_whole_images(source):  # patches in training: whole images, as predict sees them
        from unetlab.training.whole_image_validation import evaluate_whole_images

        val = evaluate_whole_images(parts.model, source.whole_images("val"), parts.loss_fn, parts.metrics,
                                    parts.device, runtime.amp_dtype)
    else:
        val = evaluate(parts.model, parts.val_loader, parts.loss_fn, parts.metrics, parts.device, runtime.amp_dtype,
                       runtime.channels_last)
    return setup.dist.broadcast(val)


def _keep_best(setup: TrainSetup, parts: _Parts, state: TrainState, record: dict[str, float], epoch: int) -> str:
    """Track the monitored metric: save 'best' on improvement, feed the schedule; return an early-stop reason or ""."""
    t = TrainSettings.from_config(setup.prepared.run.config)
    monitored = record.get(t.monitor, float("nan"))
    parts.schedule.observe(monitored)
    if is_better(monitored, state.best, t.monitor_mode):
        state.best, state.best_epoch, state.stale = monitored, epoch + 1, 0
        if setup.dist.is_main:
            save_atomic({"model": parts.model.state_dict(), "epoch": epoch + 1, "monitor": t.monitor,
                         "value": monitored, **model_identity(setup.prepared)}, setup.checkpoint_dir / "best.pt")
    else:
        state.stale += 1
    if t.early_stopping is not None and state.stale >= t.early_stopping:
        return f"early stopping: {t.monitor} did not improve for {state.stale} validation(s)"
    return ""


def _save_last(setup: TrainSetup, parts: _Parts, state: TrainState) -> None:
    save_atomic({"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                 "schedule": parts.schedule.state_dict(), "scaler": parts.scaler.state_dict() if parts.scaler else {},
                 **asdict(state), "finished": False, **model_identity(setup.prepared)},
                setup.checkpoint_dir / "last.pt")


def mark_finished(checkpoint_dir: Path) -> None:
    """Flag the 'last' checkpoint as belonging to a finished run (``--resume`` then skips it)."""
    path = checkpoint_dir / "last.pt"
    if path.exists():
        state = load_checkpoint(path)
        state["finished"] = True
        save_atomic(state, path)


def predict_logits(model, images: torch.Tensor) -> torch.Tensor:
    """Logits for a batch of images on the model's device (eval mode, no grad)."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return model(images.to(device)).float().cpu()
