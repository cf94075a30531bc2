"""Deterministic mode (``train.deterministic``): same config and seed, same numbers.

``configure(deterministic, device)`` sets PyTorch up for a run; ``report_nondeterministic_ops()`` wraps
the run so that an op without a deterministic kernel (a plugin's, say) is named once, in one line,
instead of a warning per call or silence.

Why ``warn_only=True``: with ``warn_only=False`` PyTorch raises at the first such op and the run dies;
unetlab's own components all have deterministic kernels (README "GPU"), so the only ops that can get
there are a third-party plugin's, and a one-line notice is the useful outcome for those.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator

import torch

__all__ = ["CUBLAS_WORKSPACE", "configure", "report_nondeterministic_ops"]

#: cuBLAS needs a fixed workspace for deterministic matrix products on CUDA (PyTorch's reproducibility notes).
CUBLAS_WORKSPACE = ":4096:8"

_ALERT = re.compile(r"^\s*(\S+) does not have a deterministic implementation")


def configure(deterministic: bool, device: torch.device) -> None:
    """Switch PyTorch's deterministic algorithms on or off for a run on ``device``.

    On: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN deterministic and not
    benchmarking, and on CUDA ``CUBLAS_WORKSPACE_CONFIG`` set to ``:4096:8`` unless the user set it
    (it must be set before the process's first cuBLAS call, so call this before building the model).
    Off: all of that released, and cuDNN benchmarking on for CUDA (fastest kernels for fixed shapes).
    """
    device = torch.device(device)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = device.type == "cuda"


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def report_nondeterministic_ops(emit: Callable[[str], None] = _stderr_line) -> Iterator[set[str]]:
    """Within the block, PyTorch's "X does not have a deterministic implementation" warnings become one
    line per op (``emit``, default: stderr), the first time each op is hit; other warnings pass on.

    Yields the set of op names seen so far (a run can log them).
    """
    seen: set[str] = set()
    with warnings.catch_warnings():
        # "always": every occurrence reaches the hook below, which keeps the first per op; Python's
        # default would show one per calling line instead, and nothing after the first epoch
        warnings.filterwarnings("always", message=r".*does not have a deterministic implementation",
                                category=UserWarning)
        passthrough = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            match = _ALERT.match(str(message))
            if match is None:
                passthrough(message, category, filename, lineno, file, line)
                return
            op = match.group(1)
            if op not in seen:
                seen.add(op)
                emit(f"unetlab: note: deterministic mode: '{op}' has no deterministic kernel on this device, "
                     f"so this run may not repeat exactly (train.deterministic=false silences this)")

        warnings.showwarning = show
        yield seen
