"""The training loop: one process on a CPU, or many with ``torchrun`` and DistributedDataParallel.

``train`` resolves the configuration (``resolve_config``), builds the run (``TrainingRun.build``:
data, model, optimizer, EMA, the state of a resumed run, wrappers) and runs its epochs
(``TrainingRun.run_epoch``: training steps, evaluation, save).

A run folder holds ``config.json`` (the resolved configuration, written when the run starts) and,
rewritten atomically after every epoch: ``model.safetensors`` + ``model.json`` (weights used for
evaluation, architecture, classes, config, metrics), ``state.pt`` (optimizer, schedule, EMA, history:
what ``--resume`` needs), ``metrics.jsonl`` (one line per epoch) and ``curves.png`` (loss and accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.transforms import v2
from tqdm import tqdm

from ...bcosification import remove_biases, scale_biases, set_b
from ...errors import CheckpointError, ConfigError
from ...explanation import dynamic_linear_weights
from ...fileio import atomic_write, ensure_writable_dir, remove_stale_temporaries, write_json
from ...layers import explanation_mode
from ...metrics import TopkAccuracy, topk_accuracy
from ...models import registry
from ...models.vit import Capture, VisionTransformer
from ...weights.checkpoint import load_state_dict, save_weights
from ..data import evaluation_split, load_dataset
from ..precision import PrecisionChoice, autocast, compile_available, resolve_precision
from .align import AlignmentNet
from .config import TrainConfig
from .recipe import (
    adaptive_clip_grad_,
    bce_uniform_off_labels,
    bcosify_progress,
    bias_step_ratio,
    draw_mosaic_grid,
    energy_loss,
    mosaic,
    mosaic_cells,
    mosaic_targets,
    soft_cross_entropy,
    warmup_cosine,
)
from .teacher import bcos_student, bcosified_teacher, load_teacher


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


def _subset(ds, n: int | None):
    return Subset(ds, range(min(n, len(ds)))) if n else ds


def build_model(config: TrainConfig, spec) -> VisionTransformer:
    """The model a new run starts from: ``config.model`` with fresh weights, or the B-cosified
    ``bcosify_from`` (with its biases and B = 1 for a warmup, else bias-free with B = 2)."""
    if config.bcosify_from is not None:
        if config.bcosify_warmup_epochs > 0:
            return bcosified_teacher(config.bcosify_from, spec.num_classes)
        return bcos_student(config.bcosify_from, spec.num_classes)
    options = dict(config.model_options)
    options.setdefault("in_chans", spec.in_chans)
    options.setdefault("image_size", spec.image_size)
    if not config.is_bcos:
        options.setdefault("input_mean", list(spec.mean))
        options.setdefault("input_std", list(spec.std))
    return registry.build_model(config.model, num_classes=spec.num_classes, class_names=list(spec.classes), **options)


def loss_function(config: TrainConfig):
    """``(logits, soft_targets) -> loss`` for the resolved recipe."""
    if config.loss == "bce":
        return bce_uniform_off_labels
    return lambda logits, targets: soft_cross_entropy(logits, targets, config.label_smoothing)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over ``loader``; ``config.precision`` must be resolved
    (``"fp32"`` or ``"bf16"``, not ``"auto"``)."""
    model.eval()
    loss_fn = loss_function(config)
    hits = TopkAccuracy()
    loss_sum = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(config.precision, device):
            logits = model(images).float()
        targets = F.one_hot(labels, logits.shape[1]).float()
        loss_sum += float(loss_fn(logits, targets)) * len(labels)
        hits += topk_accuracy(logits, labels)
    return {"test_top1": hits.top1, "test_top5": hits.top5, "test_loss": loss_sum / hits.total}


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    if all("train_top1" in h for h in history):  # an alignment stage has no train accuracy (no labels)
        ax_acc.plot(epochs, [h["train_top1"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["test_top1"] for h in history], "o-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _save_run(
    out: Path,
    model: nn.Module,
    eval_model: nn.Module,
    optimizer,
    ema,
    config: TrainConfig,
    epoch: int,
    history: list[dict[str, Any]],
    classes: list[str],
    extra_state: dict[str, Any] | None = None,
) -> None:
    """Write the weights, metadata, state, metrics and curves of a run after ``epoch``; ``config`` is
    resolved; ``extra_state``: what else ``--resume`` needs (``Trainer.extra_state``)."""
    save_weights(
        unwrap(eval_model),
        out / "model.safetensors",
        {
            "model_name": config.model,
            "classes": classes,
            "epoch": epoch,
            "metrics": history[-1],
            "ema": ema is not None,
            "precision": config.precision,  # what "auto" resolved to on this machine
            "train_config": config.to_dict(),
        },
    )
    state = {
        "epoch": epoch,
        "config": config.to_dict(),
        "history": history,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        **(extra_state or {}),
    }
    atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp))
    lines = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))
    _plot_curves(history, out / "curves.png")


# Settings that may change when a run is resumed: how long it runs and how it is executed.
_RESUMABLE_CHANGES = ("epochs", "num_workers", "explain_examples", "precision", "compile")


def load_resume_state(out: Path, config: TrainConfig) -> dict[str, Any]:
    """The checked contents of ``out/state.pt``, whose run must have been started with ``config``'s
    settings (``_RESUMABLE_CHANGES`` aside, "auto" compared as resolved); read with
    ``weights_only=True``, so a crafted file cannot run code (only tensors, dicts, lists, tuples,
    numbers and strings are unpickled)."""
    path = out / "state.pt"
    if not path.exists():
        raise CheckpointError(f"--resume: no state.pt in {out}; start a new run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or refused pickle
        raise CheckpointError(
            f"--resume: {path} is corrupt or holds more than tensors and plain values ({exc}); "
            "start a new run in a fresh folder"
        ) from exc
    _check_resume_state(state, path)
    # runs before the recipes stored "auto"; resolving both sides compares what the runs do
    stored = TrainConfig.from_dict(state["config"]).resolved().to_dict()
    current = config.resolved().to_dict()
    differs = sorted(
        k for k in current if k not in _RESUMABLE_CHANGES and stored.get(k) != current[k]
    )
    if differs:
        raise ConfigError(
            f"--resume: the run in {out} was started with different settings for {differs} "
            f"(stored: {[stored.get(k) for k in differs]}); resume with the same settings or use a new --out"
        )
    return state


_RESUME_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "config": (dict,),
    "history": (list,),
    "model": (dict,),
    "optimizer": (dict,),
    "ema": (dict, type(None)),
}
# entries only some runs write: alignment's projections, B-cosification's schedule
_OPTIONAL_STATE_TYPES: dict[str, tuple[type, ...]] = {"align_projections": (dict,), "bcosify": (dict,)}


def _check_resume_state(state: Any, path: Path) -> None:
    """Raise ``CheckpointError`` naming the first entry of a loaded ``state.pt`` that ``_save_run``
    would not have written (wrong type, missing, or a stored config with invalid values)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {path} holds a {type(state).__name__}, not a run state; use a fresh folder")
    optional = {key: types for key, types in _OPTIONAL_STATE_TYPES.items() if key in state}
    for key, types in {**_RESUME_STATE_TYPES, **optional}.items():
        value = state.get(key)
        if key not in state or not isinstance(value, types) or isinstance(value, bool):
            raise CheckpointError(
                f"--resume: {path}: '{key}' must be {' or '.join(t.__name__ for t in types)}, got {value!r:.60}; "
                "the file was not written by bcosvit train; start a new run in a fresh folder"
            )
    if state["epoch"] < 0 or not all(isinstance(h, dict) for h in state["history"]):
        raise CheckpointError(f"--resume: {path}: 'epoch' or 'history' is invalid; start a new run in a fresh folder")
    try:
        TrainConfig.from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"--resume: {path}: stored 'config' is invalid: {exc}") from exc


def _restore_resume_state(
    state: dict[str, Any], model: nn.Module, optimizer, ema, out: Path, align: AlignmentNet | None = None
) -> None:
    """Load the model, optimizer, EMA and alignment projections' states; a state that does not fit
    them is a ``CheckpointError``."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        if align is not None:
            align.projections.load_state_dict(state["align_projections"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"--resume: the state in {out / 'state.pt'} does not fit the model or optimizer ({str(exc)[:300]}); "
            "start a new run in a fresh folder"
        ) from exc


@dataclasses.dataclass
class TrainData:
    """The loaders of a run, the train sampler (reshuffled per epoch), the dataset spec and sizes."""

    train_loader: DataLoader
    test_loader: DataLoader
    sampler: DistributedSampler
    spec: Any
    num_train: int
    num_test: int


def build_data(config: TrainConfig, rt: Runtime) -> TrainData:
    """Loaders over local files; the sampler shards the data over processes and reshuffles per epoch."""
    train_ds, spec = load_dataset(
        config.dataset,
        "train",
        config.data_dir,
        config.image_size,
        True,
        config.randaugment,
        config.flip,
        config.crop_padding,
    )
    test_split = evaluation_split(config.dataset)
    test_ds, _ = load_dataset(config.dataset, test_split, config.data_dir, config.image_size)
    train_ds, test_ds = _subset(train_ds, config.train_subset), _subset(test_ds, config.test_subset)
    sampler = DistributedSampler(
        train_ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    train_loader = DataLoader(
        train_ds,
        config.batch_size // rt.world_size,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=True,
        persistent_workers=config.num_workers > 0,
    )
    if len(train_loader) == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {len(train_ds)} training images")
    test_loader = DataLoader(test_ds, 256, shuffle=False, num_workers=config.num_workers)
    return TrainData(train_loader, test_loader, sampler, spec, len(train_ds), len(test_ds))


def _build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The resolved ``config``'s optimizer over ``model``'s trainable parameters; no weight decay on
    norms, biases and positional embeddings."""
    decayed = lambda name, p: p.ndim > 1 and "pos_embed" not in name  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if decayed(n, p)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if not decayed(n, p)], "weight_decay": 0.0},
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)


@dataclasses.dataclass
class Trainer:
    """Everything one optimisation step needs."""

    net: nn.Module  # what the batch goes through (DDP / compiled wrapper)
    model: VisionTransformer
    optimizer: torch.optim.Optimizer
    ema: AveragedModel | None
    recipe: TrainConfig  # the run's config, resolved (no "auto")
    rt: Runtime
    num_classes: int
    total_steps: int
    align: AlignmentNet | None = None  # an alignment stage: the loss is the distance to this teacher's tokens
    bcosify_warmup: int | None = None  # steps of the B-cosification schedule (None: no schedule)

    def __post_init__(self) -> None:
        self.loss_fn = loss_function(self.recipe)
        self.mixup = v2.MixUp(alpha=self.recipe.mixup, num_classes=self.num_classes) if self.recipe.mixup else None
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
        with autocast(self.recipe.precision, self.rt.device), explanation_mode(self.model):
            logits, record = net(canvases, capture=Capture())
            weights, _, _ = dynamic_linear_weights(record, logits.gather(1, target[:, None]), create_graph=True)
            maps = (weights[:, 0] * record.inputs).sum(dim=1)
        loss = energy_loss(maps.float(), cells == target[:, None], grid)
        self.energy_sum, self.energy_batches = self.energy_sum + loss.item(), self.energy_batches + 1
        return loss

    def _update(self, loss: Tensor, step: int) -> None:
        """Backward, clipping, the optimizer's step, the B-cosification schedule, the EMA."""
        recipe = self.recipe
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}; lower lr or enable clipping")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip == "agc":
            adaptive_clip_grad_(self.params, recipe.clip_value, recipe.agc_eps)
        elif recipe.clip == "norm":
            nn.utils.clip_grad_norm_(self.params, recipe.clip_value)
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
        """Up to ``recipe.energy_canvases`` mosaic canvases tiled from a single-image batch
        ``(N, C, H, W)`` with targets ``(N, K)``, for the energy loss alone:
        ``(canvases (M, C, grid·H, grid·W), cell classes (M, grid²), grid)``."""
        grid = draw_mosaic_grid(self.recipe.mosaic_grid)
        take = min(self.recipe.energy_canvases, len(images) // grid**2) * grid**2
        canvases, _ = mosaic(images[:take], targets[:take], grid)
        return canvases, mosaic_cells(targets, grid, len(canvases)), grid

    def step(self, images: Tensor, labels: Tensor, step: int) -> tuple[float, int, int]:
        """One step; returns the batch's summed loss, number of correct predictions (the predicted
        class is a top-scored target class: for mosaics, one of the classes shown; 0 for an
        alignment step, which never reads ``labels``) and of samples."""
        recipe = self.recipe
        for group in self.optimizer.param_groups:
            group["lr"] = recipe.lr * warmup_cosine(
                step, recipe.warmup_steps, self.total_steps, recipe.min_lr / recipe.lr
            )
        images = images.to(self.rt.device, non_blocking=True)
        if self.align is not None:
            with autocast(recipe.precision, self.rt.device):
                loss = self.net(images)  # the AlignmentNet: student vs teacher tokens
            self._update(loss, step)
            return loss.item() * len(images), 0, len(images)
        labels = labels.to(self.rt.device, non_blocking=True)
        targets = F.one_hot(labels, self.num_classes).float()
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        cells = None
        if recipe.mosaic and float(torch.rand(())) < recipe.mosaic:
            grid = draw_mosaic_grid(recipe.mosaic_grid)
            images, summed = mosaic(images, targets, grid)
            cells = mosaic_cells(targets, grid, len(images))
            targets = mosaic_targets(summed, grid * grid, recipe.loss)
        with autocast(recipe.precision, self.rt.device):
            logits = self.net(images)
        classification = self.loss_fn(logits.float(), targets)
        loss = classification
        if recipe.energy_loss and cells is not None:
            loss = loss + recipe.energy_loss * self._energy_loss(images, cells, grid)
        elif recipe.energy_loss and recipe.energy_canvases:
            loss = loss + recipe.energy_loss * self._energy_loss(*self.energy_canvases(images, targets))
        self._update(loss, step)
        hits = targets.gather(1, logits.argmax(1, keepdim=True)).squeeze(1) >= targets.amax(1)
        return classification.item() * len(targets), int(hits.sum()), len(targets)


def resolve_config(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, PrecisionChoice]:
    """``config`` with every "auto" resolved: optimizer, loss and clipping by the model's family
    (``TrainConfig.resolved``), the precision by what ``device`` computes natively; and why that precision."""
    choice = resolve_precision(config.precision, device)
    return dataclasses.replace(config.resolved(), precision=choice.precision), choice


def finished_epochs(out: str | Path, config: TrainConfig) -> int:
    """The epochs the run in ``out`` has finished (0 where it holds no ``state.pt``); ``ConfigError``
    where that run was started with settings other than ``config``'s (as for ``--resume``)."""
    out = Path(out)
    return int(load_resume_state(out, config)["epoch"]) if (out / "state.pt").exists() else 0


def _start(
    config: TrainConfig, out: Path, resume: bool, stop_after: int | None
) -> tuple[TrainConfig, PrecisionChoice, Runtime]:
    """Check the settings and the run folder before any work; the resolved config, the precision
    choice and the processes."""
    config.validate()
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after must be >= 1 epoch, got {stop_after}")
    rt = setup_distributed()
    resolved, choice = resolve_config(config, rt.device)
    if rt.is_main and not resume and (out / "state.pt").exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if rt.is_main:
        remove_stale_temporaries(out)  # left by a run killed while it saved
    if config.batch_size % rt.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {rt.world_size} processes")
    tiles = config.mosaic or (config.energy_loss and config.energy_canvases)  # canvases are built only then
    if tiles and config.batch_size // rt.world_size < config.mosaic_grid**2:
        raise ConfigError(
            f"a {config.mosaic_grid}x{config.mosaic_grid} mosaic needs at least {config.mosaic_grid**2} images per "
            f"process, but the batch gives {config.batch_size // rt.world_size}; "
            "raise batch_size or lower mosaic_grid"
        )
    if rt.is_main:
        ensure_writable_dir(out, "run folder (--out)")  # fail now, not when the first epoch is saved
    return resolved, choice, rt


def _wrap(model: nn.Module, config: TrainConfig, rt: Runtime) -> tuple[nn.Module, bool]:
    """What the batches go through: DDP over several processes, ``torch.compile`` where asked and
    possible; and whether it is compiled."""
    net: nn.Module = model
    if rt.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    compiled = False
    if config.compile:
        compiled, why_not = compile_available(rt.device)
        if compiled:
            net = torch.compile(net)
        elif rt.is_main:
            print(f"torch.compile skipped: {why_not}")
    return net, compiled


def bcosify_warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int | None:
    """Steps of the B-cosification schedule (at least 1 for a warmup > 0); None without one (no
    ``bcosify_from``, or ``bcosify_warmup_epochs = 0``: the model starts bias-free with B = 2)."""
    if config.bcosify_from is None or config.bcosify_warmup_epochs == 0:
        return None
    return max(1, round(config.bcosify_warmup_epochs * steps_per_epoch))


def _without_compile_for_schedule(config: TrainConfig, warmup: int | None, rt: Runtime) -> TrainConfig:
    """``config`` without ``compile`` while a B-cosification schedule runs: B changes every step,
    and a compiled graph would be recompiled for each value."""
    if warmup is None or not config.compile:
        return config
    if rt.is_main:
        print("torch.compile skipped: B changes at every step of the B-cosification warmup")
    return dataclasses.replace(config, compile=False)


def _freeze_all_but_head(model: VisionTransformer) -> None:
    """Leave only the classifier head trainable (a linear probe on frozen features)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))


@dataclasses.dataclass
class TrainingRun:
    """A run being trained: built by ``build``, advanced one epoch at a time by ``run_epoch``."""

    config: TrainConfig  # resolved (no "auto")
    out: Path
    rt: Runtime
    data: TrainData
    trainer: Trainer
    compiled: bool
    epoch: int = 0  # the last finished epoch
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # main process only

    @classmethod
    def build(cls, config: TrainConfig, out: Path, rt: Runtime, state: dict[str, Any] | None = None) -> TrainingRun:
        """Data, model (from ``config.init_from`` in a new run), optimizer and EMA; their state from a
        resumed run's ``state`` (``load_resume_state``); then the DDP and ``torch.compile`` wrappers."""
        data = build_data(config, rt)
        torch.manual_seed(config.seed)
        model = build_model(config, data.spec).to(rt.device)
        if config.init_from and state is None:
            load_state_dict(model, config.init_from)  # fails clearly on a missing or mismatched file
        if config.train_head_only:
            _freeze_all_but_head(model)
        align = AlignmentNet(model, load_teacher(config.align_to).to(rt.device)) if config.align_to else None
        trained = align if align is not None else model
        optimizer = _build_optimizer(trained, config)
        ema = None
        if config.ema:
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        if state is not None:
            _restore_resume_state(state, model, optimizer, ema, out, align)
        warmup = bcosify_warmup_steps(config, len(data.train_loader))
        net, compiled = _wrap(trained, _without_compile_for_schedule(config, warmup, rt), rt)
        steps = len(data.train_loader) * config.epochs
        trainer = Trainer(net, model, optimizer, ema, config, rt, data.spec.num_classes, steps, align, warmup)
        epoch = 0 if state is None else int(state["epoch"])
        trainer.start_bcosify(epoch * len(data.train_loader))
        if state is None:
            return cls(config, out, rt, data, trainer, compiled)
        return cls(config, out, rt, data, trainer, compiled, epoch, list(state["history"]))

    def announce(self, precision: PrecisionChoice) -> None:
        """Print what the run trains on what, and what its "auto" settings resolved to."""
        config, data, out = self.config, self.data, self.out
        if self.epoch:
            print(f"resuming {out} after epoch {self.epoch} of {config.epochs}")
        n_params = sum(p.numel() for p in self.trainer.model.parameters())
        print(
            f"training {config.model} ({n_params / 1e6:.2f}M parameters) on {config.dataset}: {data.num_train} train / "
            f"{data.num_test} test images, {config.epochs} epochs of {len(data.train_loader)} steps, "
            f"batch {config.batch_size} on {self.rt.world_size} process(es), {torch.get_num_threads()} threads each; "
            f"run folder {out}"
        )
        print(
            f"{config.optimizer}, {config.loss} loss, {config.clip} clipping {config.clip_value:g}; "
            f"precision {precision}; "
            + ("torch.compile on (the first step compiles)" if self.compiled else "no torch.compile (eager)")
        )
        if config.bcosify_from is not None:
            warmup = self.trainer.bcosify_warmup
            print(
                f"B-cosified from {config.bcosify_from}: "
                + (f"B 1 -> 2 and biases -> 0 over the first {warmup} steps" if warmup else "B = 2, no biases")
            )
        if self.trainer.align is not None:
            align = self.trainer.align
            print(
                f"aligning to {config.align_to} without labels: student layers {align.student_layers}, "
                f"teacher layers {align.teacher_layers} and pooled features, cosine distance"
            )
        if config.train_head_only:
            print("linear probe: only the classifier head trains")

    def train_epoch(self, epoch: int, progress: bool = True) -> dict[str, Any]:
        """The optimisation steps of epoch ``epoch``: its train loss, accuracy, last lr and speed."""
        config, data, trainer = self.config, self.data, self.trainer
        steps_per_epoch = len(data.train_loader)
        data.sampler.set_epoch(epoch)
        torch.manual_seed(config.seed * 100_003 + epoch * 1009 + self.rt.rank)  # augmentation: same after --resume
        trainer.net.train()
        started = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            total=steps_per_epoch * config.batch_size,
            unit="img",
            unit_scale=True,
            leave=False,
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not (progress and self.rt.is_main),
            dynamic_ncols=True,
        )
        for i, (images, labels) in enumerate(data.train_loader):
            batch_loss, batch_correct, batch_size = trainer.step(images, labels, (epoch - 1) * steps_per_epoch + i)
            loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + batch_size
            bar.update(config.batch_size)
            accuracy = {} if trainer.align is not None else {"acc": f"{100 * correct / seen:.1f}%"}
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", **accuracy)
        bar.close()
        elapsed = time.perf_counter() - started
        images = steps_per_epoch * config.batch_size
        metrics = {"epoch": epoch, "train_loss": loss_sum / seen}
        if trainer.align is None:  # alignment reads no labels: no train accuracy
            metrics["train_top1"] = 100 * correct / seen
        return {
            **metrics,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "epoch_seconds": elapsed,
            "train_images_per_s": images / elapsed,  # teacher forward passes included
            "teacher_forwards": images if trainer.align is not None else 0,  # images through the teacher
        }

    def run_epoch(self, epoch: int, progress: bool = True) -> dict[str, Any]:
        """Train epoch ``epoch``; on the main process also evaluate, save the run and print a line.
        Returns the epoch's metrics."""
        config, rt, model, ema = self.config, self.rt, self.trainer.model, self.trainer.ema
        metrics = self.train_epoch(epoch, progress)
        eval_model = ema if ema is not None else model
        energy = self.trainer.pop_energy()
        if energy is not None:
            metrics["train_energy_loss"] = energy
        if rt.is_main:
            metrics.update(evaluate(eval_model, self.data.test_loader, config, rt.device))
            self.history.append(metrics)
            classes = list(self.data.spec.classes)
            step = epoch * len(self.data.train_loader)
            saved, extra = self.trainer.exported(eval_model, step), self.trainer.extra_state(step)
            _save_run(self.out, model, saved, self.trainer.optimizer, ema, config, epoch, self.history, classes, extra)
            accuracy = f"acc {metrics['train_top1']:.2f}% " if "train_top1" in metrics else "(alignment) "
            print(
                f"epoch {epoch}/{config.epochs}: train loss {metrics['train_loss']:.4f} {accuracy}| "
                f"test top-1 {metrics['test_top1']:.2f}% top-5 {metrics['test_top5']:.2f}% | "
                f"{metrics['epoch_seconds']:.0f}s ({metrics['train_images_per_s']:.0f} img/s)"
                + (f" | energy loss {energy:.4f}" if energy is not None else ""),
                flush=True,
            )
        if rt.world_size > 1:
            dist.barrier()
        self.epoch = epoch
        return metrics


def train(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    keep_process_group: bool = False,
) -> dict[str, Any]:
    """Train ``config`` into the run folder ``out``; returns the last epoch's metrics.

    "auto" settings are resolved once, here, and the resolved config is what the run uses and
    stores (``config.json``, ``model.json``, ``state.pt``). ``stop_after``: end this invocation
    after that many epochs (the run stays resumable), e.g. to fit a time-limited session; the
    schedule still follows ``config.epochs``. ``keep_process_group``: leave a ``torchrun`` job's
    process group open for a next stage (re-creating it between stages fails or hangs at random).
    """
    out = Path(out)
    config, precision, rt = _start(config, out, resume, stop_after)
    state = load_resume_state(out, config) if resume else None
    if rt.is_main:
        write_json(out / "config.json", config.to_dict())
    run = TrainingRun.build(config, out, rt, state)
    if rt.is_main:
        run.announce(precision)
    last_epoch = config.epochs if stop_after is None else min(config.epochs, run.epoch + stop_after)
    metrics: dict[str, Any] = run.history[-1] if run.history else {}
    for epoch in range(run.epoch + 1, last_epoch + 1):
        metrics = run.run_epoch(epoch, progress)
    if rt.world_size > 1 and not keep_process_group:
        dist.destroy_process_group()
    return metrics
