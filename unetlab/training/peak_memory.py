"""A run's peak memory, as the comparison contract reports it.

- CUDA: ``torch.cuda.max_memory_allocated`` on the run's device, reset when the run starts: the tensors
  this run allocated at their peak (the caching allocator's reserve and the CUDA context are not in it).
- CPU (and MPS): the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``). The kernel
  keeps one peak per process and never lowers it, so when one process trains several runs one after the
  other (``unetlab run`` without ``--jobs``), a later run's figure is the peak of the process so far, which
  may be an earlier run's: the kind says how many runs this process trained before, never claiming more.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

__all__ = ["PeakMemory", "start_peak_memory"]

_runs_in_process = 0  # runs this process has started measuring (sequential runs share one process peak)


@dataclass
class PeakMemory:
    """Started with ``start_peak_memory`` when a run starts; ``read()`` when it ends."""

    device: torch.device
    earlier_runs: int

    def read(self) -> tuple[float, str]:
        """(megabytes, what they measure)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "CUDA max allocated"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        megabytes = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
        if self.earlier_runs == 0:
            return megabytes, "process peak RSS"
        return megabytes, f"process peak RSS (its process trained {self.earlier_runs} run(s) before)"


def start_peak_memory(device: torch.device) -> PeakMemory:
    """Begin measuring a run's peak memory on ``device`` (resets CUDA's peak counter)."""
    global _runs_in_process
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = PeakMemory(torch.device(device), _runs_in_process)
    _runs_in_process += 1
    return meter
