"""Trainer options through the Python API (fast, in process): budgets, early stopping, schedules, loaders."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

import unetlab
from unetlab.data.sources import make_loader
from unetlab.training.lr_schedule import Schedule
from unetlab.training.preflight import prepare
from unetlab.training.trainer import TrainSetup, train_run

REGISTRY = unetlab.default_host().registry


def setup_for(tmp_path, extra: str = "", **kw) -> TrainSetup:
    path = tmp_path / "e.yaml"
    path.write_text(textwrap.dedent("""
        data: {dataset: {name: blobs, image_size: 32, n_train: 16, n_val: 8}, batch_size: 4}
        model: {encoder: {name: classic, depth: 2, base_channels: 4}}
        train: {epochs: 3, lr: 0.01, device: cpu}
    """) + textwrap.dedent(extra))
    run = unetlab.load_experiment(path, kw.pop("overrides", [])).runs[0]
    return TrainSetup(prepare(run, REGISTRY), REGISTRY, tmp_path / "ckpt", **kw)


def test_step_budget_stops_mid_epoch_and_still_validates(tmp_path):
    result = train_run(setup_for(tmp_path, overrides=["train.max_steps=6", "train.epochs=10"]))
    assert result.steps == 6 and result.epochs == 2  # 4 steps per epoch
    assert "step budget of 6 reached" in result.message
    assert "val_iou" in result.history[-1]


def test_early_stopping(tmp_path):
    # lr 1e-9 and no normalisation: a frozen model (hard predictions never change), so the IoU never improves
    result = train_run(setup_for(tmp_path, overrides=["train.epochs=10", "train.early_stopping=2", "train.lr=1e-9",
                                                      "model.encoder.norm=none", "model.block.norm=none"]))
    assert result.epochs == 3 and "early stopping" in result.message


def test_validation_every_n_epochs_and_always_last(tmp_path):
    result = train_run(setup_for(tmp_path, overrides=["train.epochs=5", "train.val_every=2"]))
    assert ["val_loss" in h for h in result.history] == [False, True, False, True, True]


def test_lr_is_logged_per_epoch_from_the_schedule(tmp_path):
    result = train_run(setup_for(tmp_path, overrides=["train.epochs=4", "train.scheduler=step", "train.step_size=2",
                                                      "train.gamma=0.5", "train.lr=0.02"]))
    assert [h["lr"] for h in result.history] == pytest.approx([0.02, 0.02, 0.01, 0.01])


def schedule(**train) -> Schedule:
    base = {"scheduler": "none", "lr": 1.0, "epochs": 10, "warmup_epochs": 0, "step_size": 3, "gamma": 0.1,
            "patience": 1, "monitor_mode": "max"}
    return Schedule({**base, **train})


def test_schedules():
    cosine = schedule(scheduler="cosine", warmup_epochs=2)
    assert [cosine.lr(e) for e in (0, 1)] == pytest.approx([1 / 3, 2 / 3])  # linear warm-up
    assert cosine.lr(2) == pytest.approx(1.0)
    assert cosine.lr(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    step = schedule(scheduler="step")
    assert [step.lr(e) for e in (0, 2, 3, 6)] == pytest.approx([1, 1, 0.1, 0.01])
    plateau = schedule(scheduler="plateau")
    for value in (0.5, 0.6, 0.6, 0.6):  # best 0.6, then two validations without improvement (> patience 1)
        plateau.observe(value)
    assert plateau.lr(5) == pytest.approx(0.1)
    restored = schedule(scheduler="plateau")
    restored.load_state_dict(plateau.state_dict())
    assert restored.lr(5) == pytest.approx(0.1)


def test_loader_gives_the_same_batches_with_workers(tmp_path):
    source = unetlab.create("dataset", "blobs", image_size=32, n_train=12, n_val=2)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(source.split("train"), 4, True, workers, False)
        loader.epoch_sampler.set_epoch(7)
        batches[workers] = [b[1] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    loader.epoch_sampler.set_epoch(8)
    assert not torch.equal(next(iter(loader))[1], batches[2][0])


def test_workers_in_a_real_run(tmp_path):
    # loader workers change where batches are made, never which: the run trains to the very same numbers
    (tmp_path / "2").mkdir(), (tmp_path / "0").mkdir()
    results = {workers: train_run(setup_for(tmp_path / str(workers),
                                            overrides=[f"data.num_workers={workers}", "train.epochs=1"]))
               for workers in (2, 0)}
    assert results[2].status == results[0].status == "FINISHED"
    learned = {w: {k: v for k, v in r.final.items() if not k.endswith("_s")} for w, r in results.items()}  # no timings
    assert "train_loss" in learned[2] and "val_loss" in learned[2] and learned[2] == learned[0]


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(unetlab.UnetlabError, match="train.amp: fp16 needs a CUDA device"):
        setup_for(tmp_path, overrides=["train.amp=fp16", "train.device=cpu"])


def test_missing_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(unetlab.UnetlabError, match="no CUDA device is available"):
        setup_for(tmp_path, overrides=["train.device=cuda"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp, compile_", [("bf16", False), ("fp16", False), ("auto", True)])
def test_gpu_path_amp_channels_last_compile(tmp_path, amp, compile_):
    result = train_run(setup_for(tmp_path, overrides=[f"train.amp={amp}", f"train.compile={str(compile_).lower()}",
                                                      "train.channels_last=true", "train.device=cuda",
                                                      "data.pin_memory=true", "train.epochs=2"]))
    assert result.status == "FINISHED" and math.isfinite(result.history[-1]["train_loss"])
    assert next(result.model.parameters()).is_cuda


def _hand_written_steps(prep, optimizer: str, clip: float | None, steps: int = 2) -> torch.nn.Module:
    """The first ``steps`` optimiser steps of a run, written directly against torch (the trainer's reference)."""
    from unetlab.model.unet import build_unet
    from unetlab.training.trainer import build_loss, epoch_seed

    t = prep.run.config["train"]
    torch.manual_seed(t["seed"])
    model = build_unet(prep.run.config["model"], prep.in_channels, prep.out_channels, REGISTRY)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    else:
        cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        opt = cls(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    loss_fn = build_loss(t, prep.num_classes, REGISTRY)
    loader = make_loader(prep.source.split("train"), prep.run.config["data"]["batch_size"], True, 0, False)
    loader.epoch_sampler.set_epoch(epoch_seed(t["seed"], 0))
    model.train()
    for _, (images, masks) in zip(range(steps), loader):
        loss = loss_fn(model(images), masks.long())
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("optimizer, clip", [("sgd", 0.05), ("adamw", 0.05), ("adamw", None)])
def test_optimizer_and_gradient_clipping_match_hand_written_steps(tmp_path, optimizer, clip):
    overrides = [f"train.optimizer={optimizer}", "train.max_steps=2", "train.epochs=1", "train.weight_decay=0.1",
                 "train.momentum=0.5", "train.lr=0.05"] + ([f"train.grad_clip={clip}"] if clip else [])
    setup = setup_for(tmp_path, overrides=overrides)
    trained = train_run(setup).model
    assert _max_difference(trained, _hand_written_steps(setup.prepared, optimizer, clip)) < 1e-6
    # the settings matter at this size: ignoring either one would give other weights, and fail the check above
    assert _max_difference(trained, _hand_written_steps(setup.prepared, "adam", clip)) > 1e-4
    other_clip = 0.05 if clip is None else None
    assert _max_difference(trained, _hand_written_steps(setup.prepared, optimizer, other_clip)) > 1e-4
