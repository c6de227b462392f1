"""Where an evaluation runs (``EvalRuntime``): the device, the precision of the accuracy pass, the
DataLoader workers, and the processes of a ``torchrun`` job that share the work: each process
(rank) measures a shard (``EvalRuntime.shard``) and every process receives all the parts
(``EvalRuntime.gather``), so rank 0 alone can write the results."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from ...errors import ConfigError
from ..data import TensorImageDataset
from ..loading import shard_range
from ..precision import PRECISIONS, PrecisionChoice, agree_on_precision, resolve_precision
from ..training.distributed import setup_distributed

DEVICES = ("auto", "cpu", "cuda")
MAX_AUTO_WORKERS = 8  # DataLoader workers per process when --workers is left to the machine


def check_device(requested: str) -> None:
    """Raise ``ConfigError`` for a device other than ``DEVICES``, or ``"cuda"`` without a CUDA device."""
    if requested not in DEVICES:
        raise ConfigError(f"device (--device) must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device (--device) cuda was asked for but torch finds no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            "use --device cpu, or auto (CUDA when there is one)"
        )


def check_precision(requested: str) -> None:
    """Raise ``ConfigError`` for a precision other than ``bcosvit.app.precision.PRECISIONS``."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision (--precision) must be one of {', '.join(PRECISIONS)}, got {requested!r}")


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA when there is a device, else the CPU; under ``torchrun`` each process takes
    the GPU of its local rank. Checked with ``check_device``."""
    check_device(requested)
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank}")


def is_in_memory(data: Dataset) -> bool:
    """True for a dataset whose images are held in memory (worker processes would only add copies)."""
    while isinstance(data, Subset):
        data = data.dataset
    return isinstance(data, TensorImageDataset)


def default_workers(data: Dataset, processes_per_machine: int = 1) -> int:
    """DataLoader workers per process when none are asked for: 0 for images held in memory, else the
    cores this process may use shared by the processes on the machine, at most ``MAX_AUTO_WORKERS``."""
    if is_in_memory(data):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, cores // max(1, processes_per_machine)))


@dataclass(frozen=True)
class EvalRuntime:
    """Where the passes of an evaluation run, and this process's place in a ``torchrun`` job.

    Attributes:
        device: where the models and the batches go.
        precision: the accuracy pass's precision (the other passes run in float32, see
            ``bcosvit.app.evaluation.protocol``).
        workers: DataLoader worker processes per pass.
        rank, world_size: this process and the number of processes (1: no ``torchrun``).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: PrecisionChoice = PrecisionChoice("fp32", "as requested")
    workers: int = 0
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True for the process that logs and writes the results (rank 0)."""
        return self.rank == 0

    def shard(self, count: int, batch_size: int) -> range:
        """This process's contiguous share of ``count`` items, cut at multiples of ``batch_size``: the
        batches of the shards are the batches one process would make, so the shards' results are its
        results (the shards, in rank order, cover ``range(count)``; ``bcosvit.app.loading.shard_range``)."""
        return shard_range(count, self.rank, self.world_size, batch_size)

    def gather(self, part: Any) -> list[Any]:
        """Every process's ``part`` in rank order, on every process (``[part]`` in a single one).
        The parts are pickled: keep them small (per-image scalars, per-cell scores) and on the CPU."""
        if self.world_size == 1:
            return [part]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, part)
        return parts

    def main_log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` on rank 0; on the other ranks a log that drops its lines (one copy of each line)."""
        return log if self.is_main else drop_line


def drop_line(line: str) -> None:
    """A log that writes nothing (the processes of a ``torchrun`` job other than rank 0)."""
    del line


def start_runtime(device: str, precision: str, workers: int | None, data: Dataset) -> EvalRuntime:
    """The runtime of an evaluation of ``data``: joins the ``torchrun`` job this process belongs to
    (``setup_distributed``: gloo on CPU, NCCL on GPU), resolves ``device`` (``resolve_device``) and
    the accuracy pass's ``precision`` there (``resolve_precision``: ``"auto"`` is bf16 where it is
    native and measured faster; process 0's choice in a distributed job), and ``workers`` (None:
    ``default_workers``)."""
    check_device(device)
    check_precision(precision)
    processes = setup_distributed()
    where = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    count = default_workers(data, per_machine) if workers is None else workers
    choice = agree_on_precision(resolve_precision(precision, where), where)
    return EvalRuntime(where, choice, count, processes.rank, processes.world_size)


def leave_runtime(runtime: EvalRuntime) -> None:
    """Leave the ``torchrun`` job's process group that ``start_runtime`` joined (nothing in a single
    process), once every collective of the evaluation has run."""
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
