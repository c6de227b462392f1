"""One optimisation step of a run (``Trainer``): the learning-rate schedule, the forward pass under
the run's precision, the loss (classification, alignment to a teacher, mosaics and the energy loss
on their exact explanations), clipping, the optimizer, the B-cosification schedule and the EMA."""

from __future__ import annotations

import dataclasses
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
from ..precision import autocast
from .align import AlignmentNet
from .builders import loss_function
from .clipping import adaptive_clip_grad_
from .config import TrainConfig
from .distributed import Runtime, unwrap
from .losses import energy_loss
from .mosaics import draw_mosaic_grid, mosaic, mosaic_cells, mosaic_targets
from .schedules import bcosify_progress, bias_step_ratio, warmup_cosine


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
    bcosify_warmup: int | None = None  # steps of the B-cosification schedule (None: no schedule)

    def __post_init__(self) -> None:
        self.loss_fn = loss_function(self.config)
        self.mixup = v2.MixUp(alpha=self.config.mixup, num_classes=self.num_classes) if self.config.mixup else None
        trained = self.align if self.align is not None else self.model
        self.params = [p for p in trained.parameters() if p.requires_grad]
        self.energy_sum, self.energy_batches = 0.0, 0

    def bcosified_models(self) -> list[VisionTransformer]:
        """The models the B-cosification schedule sets: the trained one and its EMA."""
        return [self.model] + ([unwrap(self.ema)] if self.ema is not None else [])

    def start_bcosify(self, step: int) -> None:
        """Set B as the schedule has it after ``step`` steps (the biases are in the model's state)."""
        if self.bcosify_warmup is not None:
            b, _ = bcosify_progress(step, self.bcosify_warmup)
            for model in self.bcosified_models():
                set_b(model, b)

    def _advance_bcosify(self, step: int) -> None:
        """After the update of ``step``: B and the biases as the schedule has them after ``step + 1``."""
        b, _ = bcosify_progress(step + 1, self.bcosify_warmup)
        ratio = bias_step_ratio(step, self.bcosify_warmup)
        for model in self.bcosified_models():
            set_b(model, b)
            scale_biases(model, ratio)

    def biases_gone(self, step: int) -> bool:
        """Whether the schedule has taken the biases to 0 after ``step`` steps (they are then dropped
        from the saved model)."""
        return self.bcosify_warmup is not None and bcosify_progress(step, self.bcosify_warmup)[1] == 0

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
        if self.bcosify_warmup is not None:
            b, scale = bcosify_progress(step, self.bcosify_warmup)
            state["bcosify"] = {"warmup_steps": self.bcosify_warmup, "b": b, "bias_scale": scale}
        return state

    def pop_energy(self) -> float | None:
        """Mean energy loss of the mosaic batches since the last call (None if there were none)."""
        mean = self.energy_sum / self.energy_batches if self.energy_batches else None
        self.energy_sum, self.energy_batches = 0.0, 0
        return mean

    def _energy_loss(self, canvases: Tensor, cells: Tensor, grid: int) -> Tensor:
        """Energy loss of the exact explanation of one random cell's class per canvas; the
        explanation keeps its graph so the loss trains the weights through it. Its forward pass goes
        through DDP like the classification's (not through torch.compile: no double backward)."""
        pick = torch.randint(cells.shape[1], (cells.shape[0], 1), device=cells.device)
        target = cells.gather(1, pick).squeeze(1)
        net = getattr(self.net, "_orig_mod", self.net)
        with autocast(self.config.precision, self.rt.device), explanation_mode(self.model):
            logits, record = net(canvases, capture=Capture())
            weights, _, _ = dynamic_linear_weights(record, logits.gather(1, target[:, None]), create_graph=True)
            maps = (weights[:, 0] * record.inputs).sum(dim=1)
        loss = energy_loss(maps.float(), cells == target[:, None], grid)
        self.energy_sum, self.energy_batches = self.energy_sum + loss.item(), self.energy_batches + 1
        return loss

    def _update(self, loss: Tensor, step: int) -> None:
        """Backward, clipping, the optimizer's step, the B-cosification schedule, the EMA."""
        config = self.config
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}; lower lr or enable clipping")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip == "agc":
            adaptive_clip_grad_(self.params, config.clip_value, config.agc_eps)
        elif config.clip == "norm":
            nn.utils.clip_grad_norm_(self.params, config.clip_value)
        self.optimizer.step()
        if self.bcosify_warmup is not None:
            self._advance_bcosify(step)
        if self.ema is not None:
            if self.bcosify_warmup is not None and step < self.bcosify_warmup:
                # While B and the biases change, each step's weights belong to another function: the
                # EMA follows the model and starts averaging once the schedule is over.
                self.ema.n_averaged.zero_()
            self.ema.update_parameters(self.model)

    def energy_canvases(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
        """Up to ``config.energy_canvases`` mosaic canvases tiled from a single-image batch
        ``(N, C, H, W)`` with targets ``(N, K)``, for the energy loss alone:
        ``(canvases (M, C, grid·H, grid·W), cell classes (M, grid²), grid)``."""
        grid = draw_mosaic_grid(self.config.mosaic_grid)
        take = min(self.config.energy_canvases, len(images) // grid**2) * grid**2
        canvases, _ = mosaic(images[:take], targets[:take], grid)
        return canvases, mosaic_cells(targets, grid, len(canvases)), grid

    def step(self, images: Tensor, labels: Tensor, step: int) -> tuple[float, int, int]:
        """One step; returns the batch's summed loss, number of correct predictions (the predicted
        class is a top-scored target class: for mosaics, one of the classes shown; 0 for an
        alignment step, which never reads ``labels``) and of samples."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * warmup_cosine(
                step, config.warmup_steps, self.total_steps, config.min_lr / config.lr
            )
        images = images.to(self.rt.device, non_blocking=True)
        if self.align is not None:
            with autocast(config.precision, self.rt.device):
                loss = self.net(images)  # the AlignmentNet: student vs teacher tokens
            self._update(loss, step)
            return loss.item() * len(images), 0, len(images)
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
            logits = self.net(images)
        classification = self.loss_fn(logits.float(), targets)
        loss = classification
        if config.energy_loss and cells is not None:
            loss = loss + config.energy_loss * self._energy_loss(images, cells, grid)
        elif config.energy_loss and config.energy_canvases:
            loss = loss + config.energy_loss * self._energy_loss(*self.energy_canvases(images, targets))
        self._update(loss, step)
        hits = targets.gather(1, logits.argmax(1, keepdim=True)).squeeze(1) >= targets.amax(1)
        return classification.item() * len(targets), int(hits.sum()), len(targets)
