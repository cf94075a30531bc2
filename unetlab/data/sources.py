"""Data plumbing of a run: build the dataset source, resolve ``auto`` channels, make loaders, augment."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from unetlab.data.options import configure_source
from unetlab.errors import ConfigError, UnetlabError, exception_text
from unetlab.plugin_api.registry import Registry, component_params

__all__ = [
    "CudaPrefetcher",
    "DeviceBatches",
    "EpochSampler",
    "FinishedBatches",
    "build_augment",
    "build_source",
    "fits_on_device",
    "make_batches",
    "make_loader",
    "model_io",
]



def build_source(config: Mapping[str, Any], registry: Registry) -> Any:
    """The dataset source of a resolved run config, configured by its ``data.*`` options (patch size, resize,
    normalisation, folds); its splits are not loaded. The one builder of a source: training, ``validate`` and
    ``data`` all see the same errors. Raises ``UnetlabError`` (at ``data.dataset``) on bad data, a factory
    that fails in any way, or a source that breaks the dataset contract."""
    spec = config["data"]["dataset"]
    try:
        source = registry.create("dataset", spec["name"], **component_params(spec))
    except UnetlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - any error of a plugin's factory is reported as one line
        raise ConfigError(f"cannot build dataset '{spec['name']}': {exception_text(exc)}", "data.dataset") from None
    configure_source(source, config["data"], spec["name"])
    for attr in ("in_channels", "num_classes", "split"):
        if not hasattr(source, attr):
            raise ConfigError(f"dataset '{spec['name']}' breaks the dataset contract: it has no '{attr}'",
                              "data.dataset")
    return source


def model_io(config: dict, source: Any) -> tuple[int, int, int]:
    """``(in_channels, out_channels, num_classes)``: ``auto`` follows the dataset (binary -> 1 logit)."""
    model = config["model"]
    num_classes = int(source.num_classes)
    in_channels = source.in_channels if model["in_channels"] == "auto" else model["in_channels"]
    if model["out_channels"] == "auto":
        out_channels = 1 if num_classes == 2 else num_classes
    else:
        out_channels = model["out_channels"]
        if out_channels == 1 and num_classes > 2:
            raise UnetlabError(f"model.out_channels: 1 (binary) but the dataset has {num_classes} classes")
        if out_channels > 1:
            num_classes = out_channels
    if in_channels != source.in_channels:
        raise UnetlabError(f"model.in_channels: {in_channels}, but the dataset's images have "
                           f"{source.in_channels} channel(s)")
    return in_channels, out_channels, num_classes


class EpochSampler(torch.utils.data.Sampler):
    """A permutation that depends only on the seed given to ``set_epoch``; with several ranks, each takes
    every ``world_size``-th index (like DistributedSampler), so the ranks' batches together are exactly
    the batches of one process with a ``world_size`` times larger batch."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size
        self.per_rank = -(-size // world_size)
        self.seed = 0

    def set_epoch(self, seed: int) -> None:
        """Fix the order of the next pass."""
        self.seed = seed

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[:self.per_rank * self.world_size - self.size]  # equal shards: wrap around
        return iter(order[self.rank::self.world_size])

    def __len__(self) -> int:
        return self.per_rank


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool, rank: int = 0,
                world_size: int = 1) -> DataLoader | FinishedBatches:
    """A DataLoader; with ``shuffle`` its order is set per epoch by ``loader.epoch_sampler.set_epoch(seed)``.

    Workers only read and collate (augmentation runs on the training device), so they draw no random numbers.
    A dataset with ``finish_batch`` and ``raw`` (``PatchDataset``) is loaded raw and finished per batch
    (``FinishedBatches``): the same batches, far fewer bytes through the workers' shared memory.
    """
    # a dataset drawing random patches names its sampler, which hands each index its own seed
    sampler_class = getattr(dataset, "sampler_class", EpochSampler)
    sampler = sampler_class(len(dataset), rank, world_size) if shuffle else None
    batching: dict = {"batch_size": batch_size, "sampler": sampler}
    if isinstance(dataset, torch.utils.data.TensorDataset):
        # In-memory tensors: one index per tensor fetches a whole batch, instead of N item lookups + collate.
        batching = {"batch_size": None, "sampler": torch.utils.data.BatchSampler(
            sampler or range(len(dataset)), batch_size, drop_last=False)}
    finish = getattr(dataset, "finish_batch", None)
    if finish:
        dataset = dataset.raw
        batching["collate_fn"] = getattr(dataset, "collate", None)
    loader = DataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0, **batching)
    result: DataLoader | FinishedBatches = loader
    if finish:  # workers hand over raw windows (3-6x fewer bytes through shared memory), finished here
        result = FinishedBatches(loader, finish)
    result.epoch_sampler = sampler
    return result


class FinishedBatches:
    """A DataLoader of raw batches (a dataset's ``raw`` items) that yields ``finish(*batch)``: the batches
    the dataset's own items would give. ``CudaPrefetcher`` finishes them on the GPU instead, after the
    (smaller) raw batch is copied there.

    Like a loader: iterable, ``len()``, ``epoch_sampler``; ``raw`` is the DataLoader, ``finish`` the step.
    """

    def __init__(self, raw: DataLoader, finish: Callable) -> None:
        self.raw, self.finish = raw, finish
        self.epoch_sampler: EpochSampler | None = None

    def __len__(self) -> int:
        return len(self.raw)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.raw:
            yield self.finish(*batch)


class DeviceBatches:
    """The batches of an in-memory split whose tensors live on the training device: each batch is gathered
    there with ``index_select``, in the order of the same ``EpochSampler`` a DataLoader would use, so the
    batches, their order and the numbers are those of ``make_loader`` (no host work or copy per step).

    Like a loader: iterable, ``len()`` is the number of batches, ``epoch_sampler.set_epoch(seed)``.
    """

    def __init__(self, dataset: torch.utils.data.TensorDataset, batch_size: int, sampler: EpochSampler | None,
                 device: torch.device) -> None:
        self.device = torch.device(device)
        self.tensors = [t.to(self.device) for t in dataset.tensors]  # once per run; no copy on the CPU
        self.size, self.batch_size, self.epoch_sampler = len(dataset), batch_size, sampler

    def __len__(self) -> int:
        count = len(self.epoch_sampler) if self.epoch_sampler is not None else self.size
        return (count + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = list(self.epoch_sampler) if self.epoch_sampler is not None else range(self.size)
        index = torch.as_tensor(order, dtype=torch.long).to(self.device)  # one copy per epoch
        for start in range(0, len(index), self.batch_size):
            rows = index[start:start + self.batch_size]
            yield tuple(t.index_select(0, rows) for t in self.tensors)


class CudaPrefetcher:
    """Wraps a loader of pinned CPU batches: the next batch is copied to the GPU on a side stream while
    the current one trains. Same batches, same order; the copies no longer stall the compute stream."""

    def __init__(self, loader, device: torch.device) -> None:
        self.device = torch.device(device)
        self.epoch_sampler = getattr(loader, "epoch_sampler", None)
        # raw batches (FinishedBatches) are copied as they are and finished on the GPU
        self.loader, self.finish = getattr(loader, "raw", loader), getattr(loader, "finish", None)

    def __len__(self) -> int:
        return len(self.loader)

    def _copy(self, batch, stream):
        with torch.cuda.stream(stream):
            batch = tuple(t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)
            return tuple(self.finish(*batch)) if self.finish is not None else batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in self.loader:
            ready = self._copy(batch, stream)
            if pending is not None:
                yield self._hand_over(pending, stream)
            pending = ready
        if pending is not None:
            yield self._hand_over(pending, stream)

    def _hand_over(self, batch, stream):
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for t in batch:  # the caching allocator must not reuse this memory before the compute stream is done
            t.record_stream(current)
        return batch


def fits_on_device(dataset, device: torch.device, share: float = 0.25) -> bool:
    """Whether an in-memory split (a ``TensorDataset``) should live on ``device``: on the CPU it already
    does; on CUDA when its tensors take under ``share`` of the free GPU memory."""
    if not isinstance(dataset, torch.utils.data.TensorDataset) or hasattr(dataset, "sampler_class"):
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    size = sum(t.numel() * t.element_size() for t in dataset.tensors)
    free, _ = torch.cuda.mem_get_info(device)
    return size < share * free


def make_batches(dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool,
                 device: torch.device, rank: int = 0, world_size: int = 1):
    """The batches of a run on ``device``, fastest way that gives the same batches in the same order:
    an in-memory split that fits lives on the device (``DeviceBatches``); otherwise a DataLoader
    (``make_loader``), whose pinned batches are prefetched to a GPU on a side stream (``CudaPrefetcher``).
    """
    if fits_on_device(dataset, device):
        sampler = EpochSampler(len(dataset), rank, world_size) if shuffle else None
        return DeviceBatches(dataset, batch_size, sampler, device)
    loader = make_loader(dataset, batch_size, shuffle, num_workers, pin_memory, rank, world_size)
    if torch.device(device).type == "cuda" and pin_memory:
        return CudaPrefetcher(loader, device)
    return loader


def build_augment(config: dict, registry: Registry) -> Callable | None:
    """One callable applying the configured augmentations in order, or None when there are none."""
    steps = [registry.create("augmentation", s["name"], **component_params(s)) for s in config["data"]["augment"]]
    if not steps:
        return None

    def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
        for step in steps:
            images, masks = step(images, masks, generator)
        return images, masks
    return augment
