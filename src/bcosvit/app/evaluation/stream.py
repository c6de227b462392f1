"""The test set streamed through a model: nothing holds it. One pass per model (``predict_test_set``)
keeps per image only its predicted class and its label's confidence, and accumulates the top-1/top-5
hits and the per-channel pixel sums (``Predictions``); the few images a protocol needs again are
loaded by index (``load_images``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ...metrics import TopkAccuracy, predict_logits, target_probabilities, topk_accuracy
from ..data import TensorImageDataset, batch_to_device, dataset_labels
from ..loading import collate_images, pins_memory
from ..precision import autocast
from .runtime import EvalRuntime


def tensor_test_set(images: Tensor, labels: Tensor | Sequence[int]) -> Dataset:
    """Images ``(N, C, H, W)`` (float in [0, 1], or uint8) and labels ``(N,)`` held in memory as a
    dataset of ``(image, label)`` items, yielded as they are held."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    return TensorImageDataset(images, labels, [])


def loader(data: Dataset, indices: Sequence[int], runtime: EvalRuntime, batch_size: int) -> DataLoader:
    """Batches of ``data``'s items ``indices``, in order, read by ``runtime.workers`` processes
    (pinned for a CUDA device, so ``batch_to_device`` copies while the next batch is read), stacked
    in the images' memory layout (``collate_images``: no transpose in the workers)."""
    workers = min(runtime.workers, -(-len(indices) // batch_size))
    return DataLoader(
        Subset(data, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pins_memory(runtime.device),
        collate_fn=collate_images,
    )


def load_images(data: Dataset, indices: Sequence[int], runtime: EvalRuntime, batch_size: int) -> Tensor:
    """The images ``indices`` of ``data`` as float32 ``(len(indices), C, H, W)`` in [0, 1] on
    ``runtime.device`` (a protocol's few images: grid cells, faithfulness images, examples)."""
    batches = loader(data, indices, runtime, batch_size)
    return torch.cat([batch_to_device(images, runtime.device) for images, _ in batches])


@dataclass(frozen=True)
class PixelSums:
    """Per-channel sums of pixel values in float64 (``sums`` ``(C,)``) over ``count`` pixels per
    channel: the test images' mean value, added up batch by batch (``+``)."""

    sums: Tensor
    count: int

    @classmethod
    def of(cls, images: Tensor) -> PixelSums:
        """The sums of images ``(N, C, H, W)``."""
        n, _, h, w = images.shape
        return cls(images.sum(dim=(0, 2, 3), dtype=torch.float64).cpu(), n * h * w)

    @classmethod
    def nothing(cls) -> PixelSums:
        """The sums of no pixels (what an empty shard adds)."""
        return cls(torch.zeros(0, dtype=torch.float64), 0)

    def __add__(self, other: PixelSums) -> PixelSums:
        if not other.count or not self.count:
            return other if not self.count else self
        return PixelSums(self.sums + other.sums, self.count + other.count)

    def mean(self) -> Tensor:
        """The per-channel mean ``(C, 1, 1)`` in float32 (the images' dtype)."""
        return (self.sums / self.count).float()[:, None, None]


@dataclass(frozen=True)
class Predictions:
    """What one pass of a model over a test set of ``N`` images keeps.

    Attributes:
        predicted: ``(N,)`` long, each image's highest logit's class.
        confidence: ``(N,)`` float64, the probability of each image's label (sigmoid of its logit
            for B-cos models, softmax for standard ones: ``target_probabilities``).
        accuracy: the top-1 and top-5 hits.
        pixels: the per-channel pixel sums (the ``"mean"`` deletion baseline).
    """

    predicted: Tensor
    confidence: Tensor
    accuracy: TopkAccuracy
    pixels: PixelSums

    @classmethod
    def join(cls, parts: Sequence[Predictions]) -> Predictions:
        """The predictions of consecutive shards of a test set as one."""
        accuracy, pixels = parts[0].accuracy, parts[0].pixels
        for part in parts[1:]:
            accuracy, pixels = accuracy + part.accuracy, pixels + part.pixels
        return cls(torch.cat([p.predicted for p in parts]), torch.cat([p.confidence for p in parts]), accuracy, pixels)


def predict_test_set(model: nn.Module, data: Dataset, runtime: EvalRuntime, batch_size: int) -> Predictions:
    """One pass of ``model`` over ``data`` (this process's ``runtime.shard`` of it) in
    ``runtime.precision``, gathered from every process: the same ``Predictions`` on each.

    Memory: a batch of images and its ``(B, K)`` logits at a time, and 16 bytes per image.
    """
    shard = runtime.shard(len(data), batch_size)
    is_bcos = bool(model.is_bcos)
    predicted, confidence = [], []
    accuracy, pixels = TopkAccuracy(), PixelSums.nothing()
    for images, batch_labels in loader(data, shard, runtime, batch_size):
        x = batch_to_device(images, runtime.device)
        with autocast(runtime.precision.precision, runtime.device):
            logits = predict_logits(model, x, batch_size)  # (B, K) float32 on the CPU
        batch_labels = batch_labels.long()
        predicted.append(logits.argmax(dim=1))
        confidence.append(target_probabilities(logits, batch_labels, is_bcos).double())
        accuracy = accuracy + topk_accuracy(logits, batch_labels)
        pixels = pixels + PixelSums.of(x)
    part = Predictions(_cat_long(predicted), _cat_double(confidence), accuracy, pixels)
    return Predictions.join(runtime.gather(part))


def _cat_long(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _cat_double(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def labels_of(data: Dataset) -> Tensor:
    """The labels ``(N,)`` long of a test set, read without decoding any image (``dataset_labels``)."""
    return torch.from_numpy(np.ascontiguousarray(dataset_labels(data)))
