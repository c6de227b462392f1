"""Train loaders whose augmentation depends on (run seed, epoch, item index) only, batches that
cross the worker pipe as the images come (``collate_images``), and the shards of a set that the
processes of a ``torchrun`` job share (``shard_range``, ``ShardSampler``).

DataLoader workers are seeded once, when they start; persistent workers then carry their random
state from epoch to epoch, so what an item's augmentation draws depended on the worker count, on
which worker fetched it, and on whether the run was resumed (a resumed run starts fresh workers).
Here the sampler hands out, with each index, a seed drawn from (run seed, epoch, index), and the
dataset wrapper seeds torch's random number generator (what torchvision's transforms draw from)
with it before the item's transforms: the same items come out for any ``num_workers``, with
persistent workers or without, and an epoch after ``--resume`` equals the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler, get_worker_info


def epoch_item_seeds(seed: int, epoch: int, size: int) -> np.ndarray:
    """The seed of each of the ``size`` items in epoch ``epoch`` of a run seeded ``seed``: ``(size,)``
    int64 in [0, 2**32) (torch's CPU generator keeps the low 32 bits of a seed), from numpy's seed
    sequence of ``(seed, epoch)``, so item ``i``'s seed depends on (seed, epoch, size, i) only."""
    return np.random.default_rng((seed, epoch)).integers(0, 2**32, size=size, dtype=np.int64)


class SeededSampler(Sampler[tuple[int, int]]):
    """``sampler``'s indices (a ``DistributedSampler``: this process's shard, reshuffled per epoch),
    each as ``(index, seed)`` with the item's seed for the current epoch (``epoch_item_seeds``).

    ``set_epoch(epoch)`` sets the epoch of both, as ``DistributedSampler.set_epoch`` does.
    """

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seeds = epoch_item_seeds(self.seed, self.epoch, len(self.sampler.dataset))
        for index in self.sampler:
            yield index, int(seeds[index])


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)`` (what ``SeededSampler`` yields): ``dataset[index]``
    with torch's random number generator seeded by ``seed`` while the item is read and transformed.

    The generator's previous state is restored afterwards: in the main process (``num_workers=0``)
    the item's seeding does not change what the training step draws (mixup, dropout).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        generator = torch.default_generator  # what torchvision's transforms draw from
        state = generator.get_state()
        # the CPU generator alone: torch.manual_seed also queues a seed for every accelerator
        # backend, each recording a stack trace while none is initialised (0.35 ms per item)
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def pins_memory(device: torch.device) -> bool:
    """Whether loaders feeding ``device`` should pin their batches: on CUDA, where a pinned batch
    is copied asynchronously (``batch_to_device``'s ``non_blocking=True``) and faster."""
    return device.type == "cuda"


def collate_images(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """A batch of ``(image, label)`` items: images ``(B, C, H, W)`` stacked in the memory layout
    they come in (``batch_layout``), labels int64 ``(B,)``.

    PIL's pixels are interleaved, so the uint8 ``(C, H, W)`` images made from PIL images
    (``ToImage``, ``PILToTensor``) are views of ``(H, W, C)`` memory: stacked channels-last, their
    bytes are copied as they are, where ``default_collate``'s ``(B, C, H, W)``-contiguous batch
    transposes every pixel on the CPU (0.05-0.3 ms per 224-px image in the worker);
    ``batch_to_device`` makes the batch contiguous on the device, in its float conversion. In a
    worker the batch is written straight into shared memory, as ``default_collate`` does.
    """
    images = [image for image, _ in items]
    first = images[0]
    channels, height, width = first.shape
    shape = (len(images), channels, height, width)
    if batch_layout(first) == torch.channels_last:
        strides = (channels * height * width, 1, width * channels, channels)
    else:
        strides = (channels * height * width, height * width, width, 1)
    if get_worker_info() is not None:
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        out = first.new(storage).as_strided(shape, strides)
    else:
        out = torch.empty_strided(shape, strides, dtype=first.dtype)
    torch.stack(images, out=out)
    return out, torch.tensor([int(label) for _, label in items], dtype=torch.int64)


def batch_layout(image: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a ``(C, H, W)`` image that is a view of ``(H, W, C)`` memory
    (and not also contiguous, as one-channel images are), else ``torch.contiguous_format``."""
    interleaved = image[None].is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if interleaved and not image.is_contiguous() else torch.contiguous_format


def shard_range(count: int, rank: int, world_size: int, batch_size: int = 1) -> range:
    """Process ``rank``'s contiguous share of ``count`` items, cut at multiples of ``batch_size``:
    the shards, in rank order, cover ``range(count)`` once (no item repeated, unlike
    ``DistributedSampler``'s padding), and their batches are the batches one process would make,
    so results summed over the shards are one process's, batch for batch."""
    batches = -(-count // batch_size)
    start = batches * rank // world_size * batch_size
    stop = batches * (rank + 1) // world_size * batch_size
    return range(min(start, count), min(stop, count))


class ShardSampler(Sampler[int]):
    """The indices of ``shard_range(size, rank, world_size, batch_size)``: one process's part of a
    set that every process of a ``torchrun`` job evaluates a part of (training's validation)."""

    def __init__(self, size: int, rank: int, world_size: int, batch_size: int = 1) -> None:
        self.indices = shard_range(size, rank, world_size, batch_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
