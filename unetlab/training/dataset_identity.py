"""The identity of a run's data, recorded as the run's MLflow dataset input (the runs table's Dataset
column): a name, a digest that changes whenever the data does, the split sizes and where it comes from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetlab.plugin_api.contracts import root_of

if TYPE_CHECKING:
    from unetlab.training.preflight import Prepared

__all__ = ["data_identity", "dataset_identity"]


def dataset_identity(prepared: Prepared) -> tuple[str, str, dict[str, int], str]:
    """``(name, digest, split sizes, source)`` of a prepared run's data, for ``RunTracker.log_dataset``.

    The digest covers the whole ``data`` section (generator parameters and seed, patches, resizing,
    normalisation) and, for data read from a folder, every file's path, size and modification time:
    runs on different data get different digests.
    """
    return data_identity(prepared.run.config, prepared.source)


def data_identity(config: dict, dataset_source: Any) -> tuple[str, str, dict[str, int], str]:
    """``dataset_identity`` of a run config and its built dataset source (``unetlab validate``'s contract has
    no prepared run). The split sizes: train, the images validation scores, and test when there is one."""
    data = config["data"]
    spec = data["dataset"]
    ident: dict[str, Any] = {"data": data}
    root = root_of(dataset_source)
    if root is not None:
        ident["files"] = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                                for p in Path(root).rglob("*")
                                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    from unetlab.training.whole_image_validation import (
        has_test_split,
        validation_images,  # whole images, not tiles, for a patch-trained run (imports torch)
    )

    splits = {"train": len(dataset_source.split("train")), "val": len(validation_images(dataset_source))}
    if has_test_split(dataset_source):
        splits["test"] = len(validation_images(dataset_source, "test"))
    source = str(root) if root is not None else json.dumps(spec, sort_keys=True, default=str)
    return str(spec["name"]), digest, splits, source
