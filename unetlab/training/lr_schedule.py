"""Learning-rate schedules, stepped once per epoch: none, cosine, step, plateau, each after an
optional linear warm-up. Kept as a tiny state machine so a checkpoint restores it exactly."""

from __future__ import annotations

import math

__all__ = ["Schedule", "is_better"]


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` (None: nothing yet) in ``mode`` ('max' or 'min'); NaN never does."""
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class Schedule:
    """The learning rate for each epoch, from a resolved ``train`` section."""

    def __init__(self, train: dict) -> None:
        self.kind = train["scheduler"]
        self.base_lr = train["lr"]
        self.epochs = train["epochs"]
        self.warmup = train["warmup_epochs"]
        self.step_size, self.gamma, self.patience = train["step_size"], train["gamma"], train["patience"]
        self.mode = train["monitor_mode"]
        self.plateau_factor = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad = 0

    def lr(self, epoch: int) -> float:
        """The learning rate for ``epoch`` (0-based)."""
        if epoch < self.warmup:
            return self.base_lr * (epoch + 1) / (self.warmup + 1)
        t = epoch - self.warmup
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup, 1)
            return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))
        if self.kind == "step":
            return self.base_lr * self.gamma ** (t // self.step_size)
        if self.kind == "plateau":
            return self.base_lr * self.plateau_factor
        return self.base_lr

    def observe(self, value: float) -> None:
        """Feed a validation value of the monitored metric (plateau only)."""
        if self.kind != "plateau" or math.isnan(value):
            return
        if is_better(value, self.plateau_best, self.mode):
            self.plateau_best, self.plateau_bad = value, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.patience:
                self.plateau_factor *= self.gamma
                self.plateau_bad = 0

    def state_dict(self) -> dict:
        """What a checkpoint needs to restore the schedule."""
        return {"plateau_factor": self.plateau_factor, "plateau_best": self.plateau_best,
                "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.plateau_factor = state["plateau_factor"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]
