"""Data plumbing of a run: build the dataset source, resolve ``auto`` channels, make loaders, augment."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from .errors import UnetlabError
from .registry import Registry, component_params

__all__ = ["build_source", "model_io", "make_loader", "build_augment", "EpochSampler"]



def build_source(config: dict, registry: Registry) -> Any:
    """The dataset source of a resolved run config (raises ``UnetlabError`` on bad data)."""
    spec = config["data"]["dataset"]
    try:
        source = registry.create("dataset", spec["name"], **component_params(spec))
    except (ValueError, TypeError) as exc:
        raise UnetlabError(f"data.dataset: cannot build dataset '{spec['name']}': {exc}") from None
    for attr in ("in_channels", "num_classes", "split"):
        if not hasattr(source, attr):
            raise UnetlabError(f"dataset '{spec['name']}' breaks the dataset contract: it has no '{attr}'")
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
                world_size: int = 1) -> DataLoader:
    """A DataLoader; with ``shuffle`` its order is set per epoch by ``loader.epoch_sampler.set_epoch(seed)``.

    Workers only read and collate (augmentation runs on the training device), so they draw no random numbers.
    """
    sampler = EpochSampler(len(dataset), rank, world_size) if shuffle else None
    batching: dict = {"batch_size": batch_size, "sampler": sampler}
    if isinstance(dataset, torch.utils.data.TensorDataset):
        # In-memory tensors: one index per tensor fetches a whole batch, instead of N item lookups + collate.
        batching = {"batch_size": None, "sampler": torch.utils.data.BatchSampler(
            sampler or range(len(dataset)), batch_size, drop_last=False)}
    loader = DataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0, **batching)
    loader.epoch_sampler = sampler
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
