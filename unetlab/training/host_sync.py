"""Find the operations that make a GPU wait for the host, on any device (a CPU included).

On CUDA, reading a tensor's value on the host (``.item()``, ``if tensor:``, ``int(tensor)``), a result
whose size depends on the data (a boolean mask index, ``nonzero``), a copy to host memory, or building a
tensor from host data on the device each stop the CPU until the GPU has caught up; inside a training
step that leaves the GPU idle between steps. PyTorch's ``torch.cuda.set_sync_debug_mode`` finds them,
but only on a GPU. ``record_host_syncs`` finds the same operations by watching the torch calls made,
so a CPU test can prove that a component's step has none (the first-party augmentations, losses and
metrics are tested this way, and a plugin's tests can do the same).

What it sees: the torch calls made from Python while it is active. Not seen: the backward pass (run by
autograd's engine in C++, so a custom ``autograd.Function`` whose backward reads a value escapes it; the
built-in ops' backward kernels read nothing on the host), and calls made inside a torch function that
is itself implemented in Python after dispatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncRecorder", "record_host_syncs"]

# Reading a value on the host, or a result whose size only the data can tell.
_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero",
          "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave"}
# Host data made into a tensor: on an accelerator, a blocking copy each time it runs.
_FROM_HOST = {"tensor", "as_tensor"}


def _is_mask_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _is_cpu(target) -> bool:
    return (isinstance(target, str) and target.split(":")[0] == "cpu") or \
        (isinstance(target, torch.device) and target.type == "cpu")


def _to_host(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call copies to the CPU."""
    return any(_is_cpu(t) for t in [*args[1:], kwargs.get("device")])


def _sync_of(name: str, args, kwargs) -> str | None:
    """What makes this call a host sync, or None."""
    if name in _READS:
        return name
    if name in _FROM_HOST and kwargs.get("device") is not None and not (args and isinstance(args[0], torch.Tensor)):
        return f"{name}(..., device=...)"
    if name == "new_tensor":
        return "new_tensor"
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_mask_index(args[1]):
        return f"{name} with a boolean mask"
    if name == "to" and _to_host(args, kwargs):
        return "to(cpu)"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "where(condition)"
    if name == "one_hot" and (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1:
        return "one_hot without num_classes"  # the class count is read from the data
    return None


class HostSyncRecorder(TorchFunctionMode):
    """A torch function mode that records, in ``found``, every call that would make a GPU wait for the host."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = _sync_of(getattr(func, "__name__", str(func)), args, kwargs)
        if found is not None:
            self.found.append(found)
        return func(*args, **kwargs)


@contextmanager
def record_host_syncs() -> Iterator[list[str]]:
    """``with record_host_syncs() as found:`` run torch code; ``found`` then names each host sync it made."""
    recorder = HostSyncRecorder()
    with recorder:
        yield recorder.found
