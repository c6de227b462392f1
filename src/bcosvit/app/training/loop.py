"""The training loop: one process on a CPU, or many with ``torchrun`` and DistributedDataParallel.

``train`` checks the settings and the run folder (``_start``), resolves the configuration
(``resolve_config``), builds the run (``TrainingRun.build``: data, model, optimizer, EMA, the state
of a resumed run, wrappers) and runs its epochs (``TrainingRun.run_epoch``: training steps,
``evaluate`` on the test set, save). What goes into a run folder: ``run_folder``; the step:
``step.Trainer``; the pieces it is built from: ``builders``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ...errors import ConfigError
from ...fileio import ensure_writable_dir, remove_stale_temporaries, write_json
from ...metrics import TopkAccuracy, topk_accuracy
from ...weights.checkpoint import load_state_dict
from ..data import load_dataset
from ..precision import PrecisionChoice, autocast, resolve_precision
from .align import AlignmentNet
from .builders import (
    DatasetLoader,
    TrainData,
    build_data,
    build_model,
    build_optimizer,
    freeze_all_but_head,
    loss_function,
    wrap_model,
)
from .config import TrainConfig
from .distributed import Runtime, setup_distributed
from .run_folder import load_resume_state, restore_resume_state, save_run
from .step import Trainer
from .teacher import load_teacher


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


def resolve_config(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, PrecisionChoice]:
    """``config`` with every "auto" resolved: optimizer, loss and clipping by the model's family
    (``TrainConfig.resolved``), the precision by what ``device`` computes natively; and why that precision."""
    choice = resolve_precision(config.precision, device)
    return dataclasses.replace(config.resolved(), precision=choice.precision), choice


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
    def build(
        cls,
        config: TrainConfig,
        out: Path,
        rt: Runtime,
        state: dict[str, Any] | None = None,
        dataset_loader: DatasetLoader = load_dataset,
    ) -> TrainingRun:
        """Data (each split read by ``dataset_loader``, as ``build_data`` says), model (from
        ``config.init_from`` in a new run), optimizer and EMA; their state from a resumed run's
        ``state`` (``load_resume_state``); then the DDP and ``torch.compile`` wrappers."""
        data = build_data(config, rt, dataset_loader)
        torch.manual_seed(config.seed)
        model = build_model(config, data.spec).to(rt.device)
        if config.init_from and state is None:
            load_state_dict(model, config.init_from)  # fails clearly on a missing or mismatched file
        if config.train_head_only:
            freeze_all_but_head(model)
        align = AlignmentNet(model, load_teacher(config.align_to).to(rt.device)) if config.align_to else None
        trained = align if align is not None else model
        optimizer = build_optimizer(trained, config)
        ema = None
        if config.ema:
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        if state is not None:
            restore_resume_state(state, model, optimizer, ema, out, align)
        warmup = bcosify_warmup_steps(config, len(data.train_loader))
        net, compiled = wrap_model(trained, _without_compile_for_schedule(config, warmup, rt), rt)
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
            save_run(self.out, model, saved, self.trainer.optimizer, ema, config, epoch, self.history, classes, extra)
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
    *,
    dataset_loader: DatasetLoader = load_dataset,
) -> dict[str, Any]:
    """Train ``config`` into the run folder ``out``; returns the last epoch's metrics.

    "auto" settings are resolved once, here, and the resolved config is what the run uses and
    stores (``config.json``, ``model.json``, ``state.pt``). ``stop_after``: end this invocation
    after that many epochs (the run stays resumable), e.g. to fit a time-limited session; the
    schedule still follows ``config.epochs``. ``keep_process_group``: leave a ``torchrun`` job's
    process group open for a next stage (re-creating it between stages fails or hangs at random).
    ``dataset_loader``: what reads the train and test splits, called as
    ``bcosvit.app.data.load_dataset`` is (that function by default; a wrapper can change a dataset).
    """
    out = Path(out)
    config, precision, rt = _start(config, out, resume, stop_after)
    state = load_resume_state(out, config) if resume else None
    if rt.is_main:
        write_json(out / "config.json", config.to_dict())
    run = TrainingRun.build(config, out, rt, state, dataset_loader)
    if rt.is_main:
        run.announce(precision)
    last_epoch = config.epochs if stop_after is None else min(config.epochs, run.epoch + stop_after)
    metrics: dict[str, Any] = run.history[-1] if run.history else {}
    for epoch in range(run.epoch + 1, last_epoch + 1):
        metrics = run.run_epoch(epoch, progress)
    if rt.world_size > 1 and not keep_process_group:
        dist.destroy_process_group()
    return metrics
