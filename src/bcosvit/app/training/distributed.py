"""The processes of a run: one on a CPU, or many started by ``torchrun`` (``Runtime``,
``setup_distributed``, ``is_main_process``), and ``unwrap``, the plain model inside the DDP,
``torch.compile`` and EMA wrappers."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from ...models.vit import VisionTransformer


@dataclasses.dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Runtime:
    """Join the process group when started by ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a ``torchrun`` job."""
    return int(os.environ.get("RANK", "0")) == 0


def unwrap(model: nn.Module) -> VisionTransformer:
    """The plain model inside DDP / torch.compile / EMA wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, AveragedModel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
