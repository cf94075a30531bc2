"""Checkpoint files: written atomically (temporary file, fsync, rename), loaded with ``weights_only=True``.

A checkpoint is data, never code: loading refuses any pickled object other than tensors and plain
containers. Every way a checkpoint file can be unusable (missing, empty, truncated, corrupt, carrying
pickled code, a disk that fills up while writing) is reported as one ``CheckpointError`` line naming
the file.
"""

from __future__ import annotations

import errno
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from unetlab.errors import UnetlabError

__all__ = ["CheckpointError", "load_checkpoint", "remove_stale_temporaries", "save_atomic"]

# Temporaries of save_atomic (".last.pt.PID.tmp"), of the generated-dataset cache ("NAME.PID.tmp.npz")
# and of the folder cache ("KEY.PID.THREAD.tmp.npy", "KEY.PID.THREAD.tmp.json").
_TEMPORARY = re.compile(r"^.+?\.(?P<pid>\d+)(?:\.\d+)?\.tmp(?:\.(?:npz|npy|json))?$")
# A temporary younger than this may belong to a live writer on another host sharing the folder.
_STALE_AFTER_S = 60.0
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class CheckpointError(UnetlabError):
    """A checkpoint file cannot be read (empty, truncated, corrupt, pickled code) or written (disk full)."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a kill at any moment leaves either the old or the new file.

    Raises ``CheckpointError`` ("no space left on device writing PATH") when the disk fills up; the
    previous file at ``path`` is then left as it was and the temporary is removed.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise CheckpointError(f"no space left on device writing {path}") from None
        raise
    except RuntimeError as exc:
        # torch's zip writer reports a short write (a full disk) as "[enforce fail at
        # inline_container.cc:...] unexpected pos N vs M" or "file write failed", without an errno.
        if "unexpected pos" in str(exc) or "write failed" in str(exc):
            raise CheckpointError(f"no space left on device writing {path}") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely: tensors and plain containers only, no code runs.

    Raises ``CheckpointError`` naming the file when it is missing, empty, truncated or corrupt, holds
    pickled objects other than tensors (code), or is not a checkpoint dictionary.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (a write was interrupted?)")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warnings would break the one-line report
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL (\S+)", str(exc))
        if blocked:
            raise CheckpointError(f"checkpoint {path}: refused, it asks to load the Python object "
                                  f"{blocked.group(1)} (code could run); checkpoints may hold only tensors "
                                  f"and plain values") from None
        raise CheckpointError(f"checkpoint {path}: corrupt or not a PyTorch checkpoint") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt ({_first_sentence(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, not a unetlab checkpoint "
                              f"(a dictionary with 'model')")
    return state


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporaries that killed writers left in ``directory``; return what was removed.

    Only temporaries named ``NAME.PID.tmp`` (``save_atomic``), ``NAME.PID.tmp.npz`` (the dataset cache)
    or ``NAME.PID.THREAD.tmp.npy|json`` (the folder cache) whose process is no longer alive and that have
    not changed for a minute are removed: a live writer's temporary is never touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group("pid"))
        try:
            if _alive(pid) or now - entry.stat().st_mtime < _STALE_AFTER_S:
                continue
            os.unlink(entry.path)
        except OSError:
            continue  # another process cleaned it up first
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists but belongs to someone else (or an absurd number: leave the file alone)
    return True


def _first_sentence(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".")[:160] if lines else type(exc).__name__
