"""Train one resolved run. Reads top to bottom: set up, then one loop over epochs.

Reproducibility and resume rest on one rule: everything random in an epoch (shuffling, augmentation,
dropout) is seeded from (run seed, epoch). An epoch is then a pure function of the state at its
start, so resuming from the checkpoint written at an epoch's end reproduces an uninterrupted run
exactly on CPU.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_atomic
from .data import build_augment, make_loader
from .distributed import DistContext
from .errors import UnetlabError
from .model import build_unet
from .registry import Registry, component_params
from .schedule import Schedule

__all__ = ["RunFailed", "RunResult", "TrainSetup", "pick_device", "amp_dtype", "train_run", "evaluate",
           "crop_target", "epoch_seed"]


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


@dataclass
class TrainSetup:
    """Everything ``train_run`` needs besides the config: data, sizes, where to write, whom to tell."""

    run_name: str
    config: dict
    source: Any
    in_channels: int
    out_channels: int
    num_classes: int
    registry: Registry
    checkpoint_dir: Path
    tracker: Any = None                      # RunTracker or None
    on_progress: Callable[..., None] = lambda **kw: None
    lifecycle: Callable[..., None] = lambda hook, **kw: None
    resume: dict | None = None               # a loaded 'last' checkpoint
    dist: DistContext = field(default_factory=DistContext)


def pick_device(spec: str) -> torch.device:
    """``auto``: cuda, then mps, then cpu; otherwise the named device, which must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UnetlabError(f"train.device: '{spec}' is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnetlabError(f"train.device: '{spec}' asked for, but no CUDA device is available (use auto or cpu)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UnetlabError(f"train.device: '{spec}' asked for, but MPS is not available (use auto or cpu)")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16" and device.type != "cuda":
        raise UnetlabError("train.amp: fp16 needs a CUDA device (use bf16 or off on the CPU)")
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in ``epoch`` of a run seeded with ``seed``."""
    return (seed * 1_000_003 + epoch) % 2 ** 63


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def crop_target(masks: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Centre-crop masks to the logits' size (valid padding gives a smaller output)."""
    h, w = logits.shape[-2:]
    if masks.shape[-2:] == (h, w):
        return masks
    top, left = (masks.shape[-2] - h) // 2, (masks.shape[-1] - w) // 2
    return masks[..., top:top + h, left:left + w]


def build_loss(train: dict, num_classes: int, registry: Registry) -> Callable:
    """The weighted sum of the configured losses."""
    parts = [(spec["weight"], registry.create("loss", spec["name"], num_classes=num_classes,
                                              **component_params(spec, "weight")))
             for spec in train["loss"]]

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * fn(logits, target) for w, fn in parts)
    return loss


def build_metrics(train: dict, num_classes: int, registry: Registry) -> list:
    """Fresh accumulators for the configured metrics."""
    return [registry.create("metric", s["name"], num_classes=num_classes, **component_params(s)) for s in train["metrics"]]


def make_optimizer(model: torch.nn.Module, train: dict) -> torch.optim.Optimizer:
    """adam, adamw or sgd over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"])
    cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    return cls(params, lr=train["lr"], weight_decay=train["weight_decay"])


@torch.no_grad()
def evaluate(model, loader, loss_fn, metrics, device, dtype, channels_last: bool) -> dict[str, float]:
    """Validation loss (mean over pixels-weighted batches) and every metric over the whole set."""
    model.eval()
    for m in metrics:
        m.reset()
    total, count = torch.zeros((), device=device), 0
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
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


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def train_run(setup: TrainSetup) -> RunResult:
    """Train one run to its end (epochs, steps, early stopping); raise ``RunFailed`` on a non-finite loss."""
    cfg, t = setup.config, setup.config["train"]
    seed, dist = t["seed"], setup.dist
    device = dist.device(pick_device(t["device"]))
    dtype = amp_dtype(t["amp"], device)
    channels_last = t["channels_last"] is True or (t["channels_last"] == "auto" and device.type == "cuda")
    pin = cfg["data"]["pin_memory"] is True or (cfg["data"]["pin_memory"] == "auto" and device.type == "cuda")
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # --- model, optimiser, loss, metrics, data ------------------------------------------------------
    _seed_all(seed)
    model = build_unet(cfg["model"], setup.in_channels, setup.out_channels, setup.registry).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.gradient_checkpointing = t["gradient_checkpointing"]
    if dist.enabled and t["sync_batchnorm"]:
        if device.type != "cuda":
            raise UnetlabError("train.sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, t)
    schedule = Schedule(t)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    loss_fn = build_loss(t, setup.num_classes, setup.registry)
    metrics = build_metrics(t, setup.num_classes, setup.registry)
    augment = build_augment(cfg, setup.registry)
    train_set, val_set = setup.source.split("train"), setup.source.split("val")
    if len(train_set) == 0:
        raise UnetlabError(f"run '{setup.run_name}': the training split is empty")
    batch, workers = cfg["data"]["batch_size"], cfg["data"]["num_workers"]
    train_loader = make_loader(train_set, batch, True, workers, pin, dist.rank, dist.world_size)
    val_loader = make_loader(val_set, cfg["data"]["val_batch_size"] or batch, False, workers, pin)
    steps_per_epoch = len(train_loader)

    # --- state, possibly restored -------------------------------------------------------------------
    start_epoch, step, best, best_epoch, stale, history = 0, 0, None, None, 0, []
    if setup.resume is not None:
        state = setup.resume
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, best, best_epoch = state["epoch"], state["step"], state["best"], state["best_epoch"]
        stale, history = state["stale"], state["history"]
    forward = model
    if dist.enabled:  # gradients are averaged over ranks: N processes x batch b train like one with batch N*b
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t["compile"]:
        forward = torch.compile(forward)
    setup.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = setup.checkpoint_dir / "last.pt", setup.checkpoint_dir / "best.pt"
    # what `unetlab predict CHECKPOINT` needs to rebuild the model (plain data: weights_only-safe)
    model_identity = {"model_config": cfg["model"], "in_channels": setup.in_channels,
                      "out_channels": setup.out_channels}
    if dist.is_main:
        setup.lifecycle("on_run_start", run_name=setup.run_name, config=cfg, model=model, tracker=setup.tracker)

    started = time.perf_counter()
    epochs, max_steps, mode = t["epochs"], t["max_steps"], t["monitor_mode"]
    stop_reason = ""
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        if max_steps is not None and step >= max_steps:
            break
        # --- train one epoch ---------------------------------------------------------------------
        es = epoch_seed(seed, epoch)
        rank_seed = es if dist.rank == 0 else (es * 31 + dist.rank) % 2 ** 63  # ranks augment differently
        torch.manual_seed(rank_seed)  # dropout and anything else drawing from the global generator
        generator = torch.Generator(device=device)
        generator.manual_seed(rank_seed)
        lr = schedule.lr(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loader.epoch_sampler.set_epoch(es)
        model.train()
        loss_sum, batches, images_seen = torch.zeros((), device=device), 0, 0
        epoch_start = time.perf_counter()
        for images, masks in train_loader:
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if augment is not None:
                images, masks = augment(images, masks, generator)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, dtype):
                logits = forward(images)
            loss = loss_fn(logits, crop_target(masks, logits))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if t["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            loss_sum += loss.detach()
            batches += 1
            images_seen += images.shape[0]
            step += 1
            if step % 10 == 0 or batches == steps_per_epoch:  # reading the loss syncs a GPU: not every step
                # every rank sees the same (reduced) value, so all stop together on a non-finite loss
                total = dist.sum(torch.stack([loss_sum.detach().float(), torch.tensor(float(batches), device=device)]))
                running = (total[0] / total[1]).item()
                if not math.isfinite(running):
                    raise RunFailed(f"loss became {running} at epoch {epoch + 1}, step {step}")
                setup.on_progress(epoch=epoch + 1, batch=batches, batches=steps_per_epoch, loss=running)
            if max_steps is not None and step >= max_steps:
                stop_reason = f"step budget of {max_steps} reached"
                break
        train_seconds = time.perf_counter() - epoch_start
        totals = dist.sum(torch.stack([loss_sum.detach().float(), torch.tensor(float(batches), device=device),
                                       torch.tensor(float(images_seen), device=device)]))
        train_loss, images_seen = (totals[0] / totals[1].clamp_min(1)).item(), int(totals[2].item())
        if not math.isfinite(train_loss):
            raise RunFailed(f"loss became {train_loss} at epoch {epoch + 1}, step {step}")
        record = {"train_loss": train_loss, "lr": lr, "images_per_s": images_seen / max(train_seconds, 1e-9)}

        # --- validate, keep the best, decide whether to stop --------------------------------------
        last_epoch = epoch == epochs - 1 or bool(stop_reason)
        if (epoch + 1) % t["val_every"] == 0 or last_epoch:
            # rank 0 validates on the whole set; every rank gets its numbers, so decisions agree
            val = evaluate(model, val_loader, loss_fn, metrics, device, dtype, channels_last) if dist.is_main else None
            record.update(dist.broadcast(val))
            monitored = record.get(t["monitor"], float("nan"))
            schedule.observe(monitored)
            if _better(monitored, best, mode):
                best, best_epoch, stale = monitored, epoch + 1, 0
                if dist.is_main:
                    save_atomic({"model": model.state_dict(), "epoch": epoch + 1, "monitor": t["monitor"],
                                "value": monitored, **model_identity}, best_path)
            else:
                stale += 1
            if t["early_stopping"] is not None and stale >= t["early_stopping"]:
                stop_reason = f"early stopping: {t['monitor']} did not improve for {stale} validation(s)"
        record["epoch_time_s"] = time.perf_counter() - epoch_start  # training and validation
        history.append({"epoch": epoch + 1, **record})

        # Log, then checkpoint: if killed in between, the resumed run repeats this epoch and logs the
        # same values again at the same step (harmless), rather than losing them.
        if setup.tracker is not None:
            setup.tracker.log_metrics(record, step=epoch + 1)
        if not dist.is_main:
            if stop_reason:
                break
            continue
        setup.lifecycle("on_epoch_end", run_name=setup.run_name, epoch=epoch + 1, metrics=record, model=model,
                        tracker=setup.tracker)
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                     "epoch": epoch + 1, "step": step, "best": best, "best_epoch": best_epoch, "stale": stale,
                     "history": history, "finished": False, **model_identity}, last_path)
        setup.on_progress(epoch=epoch + 1, record=record)
        if stop_reason:
            break

    if dist.is_main and best_path.exists():  # the model that is logged and compared is the best one
        model.load_state_dict(load_checkpoint(best_path)["model"])
    final = history[-1] if history else {}
    return RunResult(status="FINISHED", epochs=len(history), steps=step, final=final, best=best,
                     best_epoch=best_epoch, seconds=time.perf_counter() - started, message=stop_reason,
                     history=history, model=model)


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

