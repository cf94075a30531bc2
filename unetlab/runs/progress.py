"""What ``unetlab run`` prints: a progress bar per run, a one-line summary, or JSON lines for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["Reporter"]


class Reporter:
    """Console output of a run invocation. ``mode``: ``bar`` (default), ``quiet``, ``jsonl`` or ``silent``
    (ranks other than 0 of a distributed job)."""

    def __init__(self, mode: str = "bar", monitor: str = "val_iou") -> None:
        self.mode = mode
        self.monitor = monitor
        self._bar = None

    def emit(self, event: str, **data: Any) -> None:
        """One JSON line on stdout (jsonl mode only)."""
        if self.mode == "jsonl":
            print(json.dumps({"event": event, **data}, default=str), flush=True)

    def info(self, text: str) -> None:
        """A line for people (not in jsonl or quiet mode)."""
        if self.mode == "bar":
            print(text, flush=True)

    def line(self, text: str) -> None:
        """A progress line that quiet mode keeps too (a run placed by Ray ended); a ``message`` event in jsonl."""
        if self.mode in ("bar", "quiet"):
            print(text, flush=True)
        self.emit("message", text=text)

    def run_start(self, name: str, epochs: int, index: int, total: int) -> None:
        """A run begins."""
        self.emit("run_start", run=name, epochs=epochs, index=index, total=total)
        if self.mode == "bar" and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=epochs, desc=f"[{index}/{total}] {name}", unit="epoch", leave=False,
                             dynamic_ncols=True, file=sys.stderr)

    def progress(self, epoch: int, record: dict | None = None, loss: float | None = None, **_: Any) -> None:
        """Called during training: per logged step (loss) and per epoch (record)."""
        if record is not None:
            self.emit("epoch", epoch=epoch, **record)
            if self._bar is not None:
                self._bar.update(1)
                shown = {"loss": f"{record['train_loss']:.4f}"}
                if self.monitor in record:
                    shown[self.monitor] = f"{record[self.monitor]:.4f}"
                self._bar.set_postfix(shown)
        elif self._bar is not None and loss is not None:
            self._bar.set_postfix({"loss": f"{loss:.4f}"})

    def run_end(self, name: str, status: str, summary: dict[str, Any], message: str = "") -> None:
        """A run ended: one line for people, one event for scripts."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.emit("run_end", run=name, status=status, message=message, **summary)
        if self.mode in ("jsonl", "silent"):
            return
        parts = [f"{name:<28} {status:<8}"]
        if summary.get("best") is not None:
            parts.append(f"best {self.monitor}={summary['best']:.4f} (epoch {summary['best_epoch']})")
        if summary.get("final_monitor") is not None:
            parts.append(f"final {summary['final_monitor']:.4f}")
        if summary.get("epochs") is not None:
            parts.append(f"{summary['epochs']} epochs")
        if summary.get("seconds") is not None:
            parts.append(f"{summary['seconds']:.1f}s")
        if message:
            parts.append(f"- {message}")
        print("  ".join(parts), flush=True)
