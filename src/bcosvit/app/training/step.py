"""One optimisation step of a run (``Trainer``): the learning-rate schedule, the forward pass under
the run's precision, the loss (classification, alignment to a teacher, mosaics and the energy loss
on their exact explanations), clipping, the optimizer, the B-cosification schedule and the EMA.

A step never waits for the device: what it measures stays there as tensors (``StepSums``, the
energy loss) for the loop to read at its log intervals, and the forward passes skip the model's
pixel-range check (a read of the images' minimum and maximum), which the loader's images pass by
construction."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

from ...bcosification import remove_biases, scale_biases, set_b
from ...explanation import dynamic_linear_weights
from ...layers import explanation_mode
from ...models.vit import Capture, VisionTransformer
from ..data import batch_to_device
from ..precision import autocast
from .align import AlignmentNet
from .builders import loss_function
from .clipping import adaptive_clip_grad_
from .config import TrainConfig
from .distributed import Runtime, unwrap
from .losses import energy_loss
from .mosaics import draw_mosaic_grid, mosaic, mosaic_cells, mosaic_targets
from .schedules import BcosifySchedule, warmup_cosine


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module) -> None:
    """``ema.update_parameters(model)`` for an EMA of parameters and buffers (``use_buffers=True``,
    ``multi_avg_fn``), the same arithmetic without its waits for the device: torch copies the
    average count, a host tensor, to the device before each update (a blocking copy), for an
    update that never reads it."""
    averaged = [t.detach() for t in itertools.chain(ema.module.parameters(), ema.module.buffers())]
    current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
    if int(ema.n_averaged) == 0:  # the first update copies
        torch._foreach_copy_(averaged, current)
    else:
        by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
        for mine, theirs in zip(averaged, current, strict=True):
            group = by_dtype.setdefault(mine.dtype, ([], []))
            group[0].append(mine)
            group[1].append(theirs)
        for mine, theirs in by_dtype.values():  # the average function takes tensors of one dtype
            ema.multi_avg_fn(mine, theirs, ema.n_averaged)
    ema.n_averaged += 1


@dataclasses.dataclass
class StepSums:
    """What one step measured, on the device: its summed loss (0-dim float), correct predictions
    (0-dim int) and, known on the host, its number of samples."""

    loss: Tensor
    hits: Tensor
    count: int


@dataclasses.dataclass
class Trainer:
    """Everything one optimisation step needs."""

    net: nn.Module  # what the batch goes through (DDP / compiled wrapper)
    model: VisionTransformer
    optimizer: torch.optim.Optimizer
    ema: AveragedModel | None
    config: TrainConfig  # the run's config, resolved (no "auto")
    rt: Runtime
    num_classes: int
    total_steps: int
    align: AlignmentNet | None = None  # an alignment stage: the loss is the distance to this teacher's tokens
    bcosify: BcosifySchedule | None = None  # the B-cosification schedule (None: none)

    def __post_init__(self) -> None:
        self.loss_fn = loss_function(self.config)
        self.mixup = v2.MixUp(alpha=self.config.mixup, num_classes=self.num_classes) if self.config.mixup else None
        trained = self.align if self.align is not None else self.model
        self.params = [p for p in trained.parameters() if p.requires_grad]
        self.energy_sum: Tensor | None = None  # on the device, summed over the batches since pop_energy
        self.energy_batches = 0

    def bcosified_models(self) -> list[VisionTransformer]:
        """The models the B-cosification schedule sets: the trained one and its EMA."""
        return [self.model] + ([unwrap(self.ema)] if self.ema is not None else [])

    def start_bcosify(self, step: int) -> None:
        """Set B as the schedule has it after ``step`` steps (the biases are in the model's state)."""
        if self.bcosify is not None:
            for model in self.bcosified_models():
                set_b(model, self.bcosify.b(step))

    def _advance_bcosify(self, step: int) -> None:
        """After the update of ``step``: B and the biases as the schedule has them after ``step + 1``."""
        b = self.bcosify.b(step + 1)
        ratios = self.bcosify.bias_ratios(step)
        for model in self.bcosified_models():
            set_b(model, b)
            scale_biases(model, *ratios)

    def biases_gone(self, step: int) -> bool:
        """Whether the schedule has taken the biases to 0 after ``step`` steps (they are then dropped
        from the saved model)."""
        return self.bcosify is not None and self.bcosify.biases_gone(step)

    def exported(self, model: nn.Module, step: int) -> VisionTransformer:
        """The plain model to save after ``step`` steps: bias-free (``remove_biases``) once the
        B-cosification schedule has taken its biases to 0."""
        plain = unwrap(model)
        return remove_biases(plain) if self.biases_gone(step) and plain.config.bias else plain

    def extra_state(self, step: int) -> dict[str, Any]:
        """Run state beyond the model, optimizer and EMA: the alignment projections (``--resume``
        needs them) and, as a record, where the B-cosification schedule stands (``--resume``
        derives it again from the step, ``start_bcosify``)."""
        state: dict[str, Any] = {}
        if self.align is not None:
            state["align_projections"] = self.align.projections.state_dict()
        if self.bcosify is not None:
            state["bcosify"] = self.bcosify.record(step)
        return state

    def pop_energy(self) -> float | None:
        """Mean energy loss of the mosaic batches since the last call (None if there were none);
        reads the device's sum (a synchronisation: once an epoch)."""
        mean = float(self.energy_sum) / self.energy_batches if self.energy_sum is not None else None
        self.energy_sum, self.energy_batches = None, 0
        return mean

    def _energy_loss(self, canvases: Tensor, cells: Tensor, grid: int) -> Tensor:
        """Energy loss of the exact explanation of one random cell's class per canvas; the
        explanation keeps its graph so the loss trains the weights through it. Its forward pass goes
        through DDP like the classification's (not through torch.compile: no double backward)."""
        pick = torch.randint(cells.shape[1], (cells.shape[0], 1), device=cells.device)
        target = cells.gather(1, pick).squeeze(1)
        net = getattr(self.net, "_orig_mod", self.net)
        with autocast(self.config.precision, self.rt.device), explanation_mode(self.model):
            logits, record = net(canvases, capture=Capture(), check=False)
            weights, _, _ = dynamic_linear_weights(record, logits.gather(1, target[:, None]), create_graph=True)
            maps = (weights[:, 0] * record.inputs).sum(dim=1)
        loss = energy_loss(maps.float(), cells == target[:, None], grid)
        detached = loss.detach()
        self.energy_sum = detached if self.energy_sum is None else self.energy_sum + detached
        self.energy_batches += 1
        return loss

    def _update(self, loss: Tensor, step: int) -> None:
        """Backward, clipping, the optimizer's step, the B-cosification schedule, the EMA. A
        non-finite loss is not looked for here (that would wait for the device): the loop finds it
        in the running sums before anything is saved."""
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip == "agc":
            adaptive_clip_grad_(self.params, config.clip_value, config.agc_eps)
        elif config.clip == "norm":
            nn.utils.clip_grad_norm_(self.params, config.clip_value)
        self.optimizer.step()
        if self.bcosify is not None:
            self._advance_bcosify(step)
        if self.ema is not None:
            if self.bcosify is not None and step < self.bcosify.steps:
                # While B and the biases change, each step's weights belong to another function: the
                # EMA follows the model and starts averaging once the schedule is over.
                self.ema.n_averaged.zero_()
            update_ema(self.ema, self.model)

    def energy_canvases(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
        """Up to ``config.energy_canvases`` mosaic canvases tiled from a single-image batch
        ``(N, C, H, W)`` with targets ``(N, K)``, for the energy loss alone:
        ``(canvases (M, C, grid·H, grid·W), cell classes (M, grid²), grid)``."""
        grid = draw_mosaic_grid(self.config.mosaic_grid)
        take = min(self.config.energy_canvases, len(images) // grid**2) * grid**2
        canvases, _ = mosaic(images[:take], targets[:take], grid)
        return canvases, mosaic_cells(targets, grid, len(canvases)), grid

    def step(self, images: Tensor, labels: Tensor, step: int) -> StepSums:
        """One step on images ``(N, C, H, W)`` (uint8 or float in [0, 1], as the loader gives them)
        and labels ``(N,)``; returns, without waiting for the device, the batch's summed loss, number
        of correct predictions (the predicted class is a top-scored target class: for mosaics, one of
        the classes shown; 0 for an alignment step, which never reads ``labels``) and of samples."""
        config = self.config
        for group in self.optimizer.param_groups:  # lr_scale: config.lr_scales (build_optimizer)
            group["lr"] = (
                config.lr
                * group.get("lr_scale", 1.0)
                * warmup_cosine(step, config.warmup_steps, self.total_steps, config.min_lr / config.lr)
            )
        images = batch_to_device(images, self.rt.device)
        if self.align is not None:
            with autocast(config.precision, self.rt.device):
                loss = self.net(images)  # the AlignmentNet: student vs teacher tokens
            self._update(loss, step)
            return StepSums(loss.detach() * len(images), images.new_zeros((), dtype=torch.long), len(images))
        labels = labels.to(self.rt.device, non_blocking=True)
        targets = F.one_hot(labels, self.num_classes).float()
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        cells = None
        if config.mosaic and float(torch.rand(())) < config.mosaic:
            grid = draw_mosaic_grid(config.mosaic_grid)
            images, summed = mosaic(images, targets, grid)
            cells = mosaic_cells(targets, grid, len(images))
            targets = mosaic_targets(summed, grid * grid, config.loss)
        with autocast(config.precision, self.rt.device):
            logits = self.net(images, check=False)
        classification = self.loss_fn(logits.float(), targets)
        loss = classification
        if config.energy_loss and cells is not None:
            loss = loss + config.energy_loss * self._energy_loss(images, cells, grid)
        elif config.energy_loss and config.energy_canvases:
            loss = loss + config.energy_loss * self._energy_loss(*self.energy_canvases(images, targets))
        self._update(loss, step)
        hits = targets.gather(1, logits.argmax(1, keepdim=True)).squeeze(1) >= targets.amax(1)
        return StepSums(classification.detach() * len(targets), hits.sum(), len(targets))
