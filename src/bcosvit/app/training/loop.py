"""The training loop: one process on a CPU, or many with ``torchrun`` and DistributedDataParallel.

``train`` checks the settings and the run folder (``_start``), resolves the configuration
(``resolve_config``), builds the run (``TrainingRun.build``: data, model, optimizer, EMA, the state
of a resumed run, wrappers) and runs its epochs (``TrainingRun.run_epoch``: training steps,
``evaluate`` on the test set every ``eval_every`` epochs, save). What goes into a run folder:
``run_folder``; the step: ``step.Trainer``; the pieces it is built from: ``builders``.

The steps do not wait for the device: their sums stay there (``RunningSums``) and are read every
``log_every`` steps and at the end of the epoch, where a non-finite loss stops the run before
anything is saved. Every process validates its shard of the test set; the sums are added up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ...errors import ConfigError
from ...fileio import remove_stale_temporaries, write_json
from ...metrics import TopkAccuracy, topk_accuracy
from ...weights.checkpoint import load_state_dict
from ..data import batch_to_device
from ..precision import PrecisionChoice, agree_on_precision, autocast, compile_available, resolve_precision
from .align import AlignmentNet
from .builders import (
    DatasetLoader,
    TrainData,
    build_data,
    build_model,
    build_optimizer,
    freeze_all_but_head,
    layer_decay_scales,
    loss_function,
    needs_new_head,
    run_dataset_loader,
    wrap_model,
)
from .config import TrainConfig, finetune_source
from .distributed import Runtime, is_main_process, setup_distributed, unwrap
from .run_folder import (
    check_free_space,
    load_resume_state,
    restore_resume_state,
    save_bytes,
    save_run,
    writing_run_folder,
)
from .schedules import BcosifySchedule
from .step import StepSums, Trainer
from .teacher import load_teacher

# Validation is compiled only where the run validates at least this many images per process: for
# the main job's model on 2 cores, compiling the eval graph costs 23-25 s and saves 0.64 ms per image
# in float32 (break-even about 37k images) and nothing in bf16 (docs/results.md, "Performance").
COMPILE_VALIDATION_MIN_IMAGES = 50_000


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, config: TrainConfig, device: torch.device, sharded: bool = False
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over ``loader``; ``config.precision`` must be resolved
    (``"fp32"`` or ``"bf16"``, not ``"auto"``). ``sharded``: every process of the job calls this
    on its own shard of the set (``loading.ShardSampler``); the counts and losses are summed over
    the processes and each returns the metrics of the whole set."""
    model.eval()
    loss_fn = loss_function(config)
    hits = TopkAccuracy()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = batch_to_device(images, device), labels.to(device, non_blocking=True)
        with autocast(config.precision, device):
            logits = model(images, check=False).float()  # the loader's images are in [0, 1]
        targets = F.one_hot(labels, logits.shape[1]).float()
        loss_sum += loss_fn(logits, targets).double() * len(labels)
        hits += topk_accuracy(logits, labels)
    sums = torch.stack([loss_sum, *loss_sum.new_tensor([hits.top1_hits, hits.top5_hits, hits.total])])
    if sharded:
        dist.all_reduce(sums)
    loss, top1_hits, top5_hits, total = sums.tolist()
    whole = TopkAccuracy(int(top1_hits), int(top5_hits), int(total))
    return {"test_top1": whole.top1, "test_top5": whole.top5, "test_loss": loss / whole.total}


def resolve_config(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, PrecisionChoice]:
    """``config`` with every "auto" resolved: optimizer, loss and clipping by the model's family
    (``TrainConfig.resolved``), the precision by what ``device`` computes natively and measures faster
    (``resolve_precision``; in a distributed job process 0's choice, so every process must call this);
    and why that precision."""
    choice = agree_on_precision(resolve_precision(config.precision, device), device)
    return dataclasses.replace(config.resolved(), precision=choice.precision), choice


def _start(config: TrainConfig, out: Path, resume: bool) -> tuple[TrainConfig, PrecisionChoice, Runtime]:
    """Check the run folder and the settings that depend on the processes before any work (``train``
    has validated ``config`` and holds the folder: ``writing_run_folder``); the resolved config, the
    precision choice and the processes."""
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
    return resolved, choice, rt


def compile_from_step(config: TrainConfig, warmup: int | None, rt: Runtime) -> int | None:
    """The step from which a run's forward passes are compiled: 0, or the end of a B-cosification
    warmup (B changes at every step of it, and a compiled graph would be recompiled for each
    value); None: eager throughout, where ``compile`` is off or cannot run here (the main process
    says why)."""
    if not config.compile:
        return None
    available, why_not = compile_available(rt.device)
    if not available:
        if rt.is_main:
            print(f"torch.compile skipped: {why_not}")
        return None
    return warmup or 0


@dataclasses.dataclass
class RunningSums:
    """An epoch's summed loss and correct predictions, kept on the device (adding a step's waits for
    nothing); ``read`` brings them to the host. ``checked``: the steps known to have finite losses."""

    loss: Tensor  # 0-dim float64
    hits: Tensor  # 0-dim float64
    seen: int = 0
    steps: int = 0
    checked: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> RunningSums:
        loss, hits = torch.zeros(2, dtype=torch.float64, device=device).unbind()
        return cls(loss, hits)

    def add(self, step: StepSums) -> None:
        self.loss += step.loss
        self.hits += step.hits
        self.seen, self.steps = self.seen + step.count, self.steps + 1

    def read(self, epoch: int, all_processes: bool = False) -> tuple[float, float, int]:
        """``(summed loss, correct predictions, samples)``, over all processes of the job with
        ``all_processes``; ``FloatingPointError`` if a loss since the last read was not finite."""
        sums = torch.stack([self.loss, self.hits, self.loss.new_tensor(self.seen)])
        if all_processes:
            dist.all_reduce(sums)
        loss, hits, seen = sums.tolist()
        if not math.isfinite(loss):
            kept = f"--resume continues after epoch {epoch - 1}" if epoch > 1 else "the run folder holds no epoch"
            raise FloatingPointError(
                f"the loss became {loss} in steps {self.checked + 1}-{self.steps} of epoch {epoch}; "
                f"lower lr or enable clipping. Nothing of epoch {epoch} was saved: {kept}"
            )
        self.checked = self.steps
        return loss, hits, int(seen)


@dataclasses.dataclass
class TrainingRun:
    """A run being trained: built by ``build``, advanced one epoch at a time by ``run_epoch``."""

    config: TrainConfig  # resolved (no "auto")
    out: Path
    rt: Runtime
    data: TrainData
    trainer: Trainer
    compile_from: int | None  # the step from which the forward passes are compiled (None: never)
    epoch: int = 0  # the last finished epoch
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # main process only
    compiled: bool = False  # whether the forward passes are compiled by now
    eval_net: nn.Module | None = None  # the compiled evaluation model, once there is one

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        out: Path,
        rt: Runtime,
        state: dict[str, Any] | None = None,
        dataset_loader: DatasetLoader | None = None,
    ) -> TrainingRun:
        """Data (each split read by ``dataset_loader``, as ``build_data`` says; None: the run's own,
        ``run_dataset_loader``), model (from ``config.init_from`` in a new run, or fine-tuned from
        ``config.finetune_from``), optimizer and EMA; their state from a resumed run's ``state``
        (``load_resume_state``); then the DDP wrapper, and ``torch.compile`` if it is due
        (``compile_from_step``)."""
        data = build_data(config, rt, dataset_loader or run_dataset_loader(config))
        torch.manual_seed(config.seed)
        model = build_model(config, data.spec).to(rt.device)
        if config.init_from and state is None:
            load_state_dict(model, config.init_from)  # fails clearly on a missing or mismatched file
        if config.train_head_only:
            freeze_all_but_head(model)
        model.set_grad_checkpointing(config.grad_checkpointing)
        align = AlignmentNet(model, load_teacher(config.align_to).to(rt.device)) if config.align_to else None
        trained = align if align is not None else model
        optimizer = build_optimizer(trained, config)
        ema = None
        if config.ema:
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        if state is not None:
            restore_resume_state(state, model, optimizer, ema, out, align)
        steps = len(data.train_loader) * config.epochs
        net = wrap_model(trained, rt)
        schedule = BcosifySchedule.from_config(config, len(data.train_loader))
        warmup = None if schedule is None else schedule.b_steps  # B is fixed from here: compiling pays
        trainer = Trainer(net, model, optimizer, ema, config, rt, data.spec.num_classes, steps, align, schedule)
        epoch = 0 if state is None else int(state["epoch"])
        trainer.start_bcosify(epoch * len(data.train_loader))
        history = [] if state is None else list(state["history"])
        run = cls(config, out, rt, data, trainer, compile_from_step(config, warmup, rt), epoch, history)
        run.compile_if_due(epoch * len(data.train_loader))
        return run

    def compile_if_due(self, done: int) -> None:
        """Compile the training forward pass once ``done`` steps reach ``compile_from`` (and say
        so where that is after a B-cosification warmup)."""
        if self.compiled or self.compile_from is None or done < self.compile_from:
            return
        self.trainer.net = torch.compile(self.trainer.net)
        self.compiled = True
        if self.compile_from and self.rt.is_main:
            print(f"torch.compile on from step {done + 1}: the B-cosification warmup is over (B = 2 from now on)")

    def validated_images(self) -> int:
        """How many test images each process validates over the whole run."""
        config = self.config
        passes = sum(self.validates(epoch) for epoch in range(1, config.epochs + 1))
        return -(-self.data.num_test // self.rt.world_size) * passes

    def compiles_validation(self) -> bool:
        """Whether validation runs compiled: where training compiles and the run validates enough
        images for the eval graph's compilation to pay off (``COMPILE_VALIDATION_MIN_IMAGES``)."""
        return self.compile_from is not None and self.validated_images() >= COMPILE_VALIDATION_MIN_IMAGES

    def evaluation_net(self) -> nn.Module:
        """What validation runs: the EMA or the model, compiled where the training step is and
        ``compiles_validation`` says it pays off (eval mode without gradients: no DDP wrapper)."""
        model = self.trainer.ema if self.trainer.ema is not None else self.trainer.model
        if not (self.compiled and self.compiles_validation()):
            return model
        if self.eval_net is None:
            self.eval_net = torch.compile(unwrap(model))
        return self.eval_net

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
        if self.compiled:
            compiling = "torch.compile on (the first step compiles)"
        elif self.compile_from is not None:
            compiling = f"eager through the B-cosification warmup, torch.compile from step {self.compile_from + 1}"
        else:
            compiling = "no torch.compile (eager)"
        if self.compile_from is not None and not self.compiles_validation():
            compiling += (
                f", validation eager ({self.validated_images()} images in all: compiling it pays from "
                f"{COMPILE_VALIDATION_MIN_IMAGES})"
            )
        print(
            f"{config.optimizer}, {config.loss} loss, {config.clip} clipping {config.clip_value:g}; "
            f"precision {precision}; {compiling}" + ("; gradient checkpointing" if config.grad_checkpointing else "")
        )
        if config.bcosify_from is not None:
            schedule = self.trainer.bcosify
            if schedule is None:
                said = "B = 2, no biases"
            elif schedule.b_steps == schedule.bias_steps == schedule.norm_bias_steps:
                said = f"B 1 -> 2 and biases -> 0 over the first {schedule.b_steps} steps"
            else:
                said = (
                    f"B 1 -> 2 over the first {schedule.b_steps} steps, biases -> 0 over {schedule.bias_steps}, "
                    f"the norms' biases over {schedule.norm_bias_steps}"
                )
            print(f"B-cosified from {config.bcosify_from}: {said}")
        if self.trainer.align is not None:
            align = self.trainer.align
            print(
                f"aligning to {config.align_to} without labels: student layers {align.student_layers}, "
                f"teacher layers {align.teacher_layers} and pooled features, cosine distance"
            )
        if config.finetune_from is not None:
            print(self._finetune_line())
        if config.train_head_only:
            print("linear probe: only the classifier head trains")
        elif config.layer_decay is not None:
            depth = len(self.trainer.model.blocks)
            scales = layer_decay_scales(self.trainer.model, config.layer_decay)
            print(
                f"layer decay {config.layer_decay:g}: lr x {scales['tokenizer']:.3g} for the tokenizer, "
                f"x {scales['blocks.0']:.3g} for block 0 ... x {scales[f'blocks.{depth - 1}']:.3g} for block "
                f"{depth - 1}, x 1 for the head"
            )

    def _finetune_line(self) -> str:
        """What a fine-tuning run starts from, and whether its head is new."""
        config, spec, model = self.config, self.data.spec, self.trainer.model
        source = finetune_source(config.finetune_from, config.finetune_pretrained, config.finetune_weights)
        arch = source.architecture
        weights = f" ({source.pretrained} weights)" if source.path is None else ""
        if needs_new_head(config, list(spec.classes), arch.class_names, arch.num_classes):
            bias = f", logit bias {model.logit_bias_value:.3f} = log(1/(C-1))" if model.is_bcos else ""
            head = f"a new head for its {spec.num_classes} classes{bias} (the source's had {arch.num_classes})"
        else:
            head = f"the source's head for its {spec.num_classes} classes"
        return (
            f"fine-tuning {config.finetune_from}{weights}, {arch.in_chans}x{model.image_size}x{model.image_size} "
            f"inputs, on {config.dataset}: {head}"
        )

    def train_epoch(self, epoch: int, progress: bool = True) -> dict[str, Any]:
        """The optimisation steps of epoch ``epoch``: its train loss and accuracy (over all
        processes), last lr and speed. The running sums are read every ``log_every`` steps."""
        config, data, trainer = self.config, self.data, self.trainer
        steps_per_epoch = len(data.train_loader)
        data.sampler.set_epoch(epoch)
        torch.manual_seed(config.seed * 100_003 + epoch * 1009 + self.rt.rank)  # augmentation: same after --resume
        trainer.net.train()
        started = time.perf_counter()
        sums = RunningSums.zeros(self.rt.device)
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
            step = (epoch - 1) * steps_per_epoch + i
            self.compile_if_due(step)
            sums.add(trainer.step(images, labels, step))
            bar.update(config.batch_size)
            if (i + 1) % config.log_every == 0 and i + 1 < steps_per_epoch:
                bar.set_postfix(self._progress(*sums.read(epoch)))
        loss_sum, correct, seen = sums.read(epoch, all_processes=self.rt.world_size > 1)
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

    def _progress(self, loss_sum: float, correct: float, seen: int) -> dict[str, str]:
        """The progress bar's running loss and (with labels) accuracy of this process."""
        accuracy = {} if self.trainer.align is not None else {"acc": f"{100 * correct / seen:.1f}%"}
        return {"loss": f"{loss_sum / seen:.4f}", **accuracy}

    def validates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` ends with a validation: every ``eval_every`` epochs and the last."""
        return epoch % self.config.eval_every == 0 or epoch == self.config.epochs

    def run_epoch(self, epoch: int, progress: bool = True) -> dict[str, Any]:
        """Train epoch ``epoch``, validate where due (every process its shard of the test set);
        on the main process save the run and print a line. Returns the epoch's metrics."""
        config, rt, model, ema = self.config, self.rt, self.trainer.model, self.trainer.ema
        metrics = self.train_epoch(epoch, progress)
        eval_model = ema if ema is not None else model
        energy = self.trainer.pop_energy()
        if energy is not None:
            metrics["train_energy_loss"] = energy
        if self.validates(epoch):
            self.compile_if_due(epoch * len(self.data.train_loader))
            sharded = rt.world_size > 1
            metrics.update(evaluate(self.evaluation_net(), self.data.test_loader, config, rt.device, sharded))
        if rt.is_main:
            self.history.append(metrics)
            classes = list(self.data.spec.classes)
            step = epoch * len(self.data.train_loader)
            saved, extra = self.trainer.exported(eval_model, step), self.trainer.extra_state(step)
            save_run(self.out, model, saved, self.trainer.optimizer, ema, config, epoch, self.history, classes, extra)
            self._print_epoch(metrics)
        if rt.world_size > 1:
            dist.barrier()
        self.epoch = epoch
        return metrics

    def _print_epoch(self, metrics: dict[str, Any]) -> None:
        """The line that sums up an epoch: train loss and accuracy, test accuracy (or that the
        epoch was not validated), time, speed, energy loss."""
        config = self.config
        accuracy = f"acc {metrics['train_top1']:.2f}% " if "train_top1" in metrics else "(alignment) "
        if "test_top1" in metrics:
            tested = f"test top-1 {metrics['test_top1']:.2f}% top-5 {metrics['test_top5']:.2f}%"
        else:
            tested = f"not validated (every {config.eval_every} epochs and after the last)"
        energy = metrics.get("train_energy_loss")
        print(
            f"epoch {metrics['epoch']}/{config.epochs}: train loss {metrics['train_loss']:.4f} {accuracy}| "
            f"{tested} | {metrics['epoch_seconds']:.0f}s ({metrics['train_images_per_s']:.0f} img/s)"
            + (f" | energy loss {energy:.4f}" if energy is not None else ""),
            flush=True,
        )


def train(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    keep_process_group: bool = False,
    *,
    dataset_loader: DatasetLoader | None = None,
) -> dict[str, Any]:
    """Train ``config`` into the run folder ``out``; returns the last epoch's metrics.

    The main process holds ``out`` for the whole run (``writing_run_folder``: a second run on the
    same folder is refused) and checks first that its file system can take a save.

    "auto" settings are resolved once, here, and the resolved config is what the run uses and
    stores (``config.json``, ``model.json``, ``state.pt``). ``stop_after``: end this invocation
    after that many epochs (the run stays resumable), e.g. to fit a time-limited session; the
    schedule still follows ``config.epochs``. ``keep_process_group``: leave a ``torchrun`` job's
    process group open for a next stage (re-creating it between stages fails or hangs at random).
    ``dataset_loader``: what reads the train and test splits, called as
    ``bcosvit.app.data.load_dataset`` is (None: the run's own, ``builders.run_dataset_loader``:
    ``load_dataset`` with the channels of a timm teacher or fine-tuning source; a wrapper can change
    a dataset).
    """
    out = Path(out)
    config.validate()
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after must be >= 1 epoch, got {stop_after}")
    # one writer per run folder: the main process holds it from the first check to the last save
    with writing_run_folder(out) if is_main_process() else contextlib.nullcontext():
        config, precision, rt = _start(config, out, resume)
        state = load_resume_state(out, config) if resume else None
        if rt.is_main:
            write_json(out / "config.json", config.to_dict())
        run = TrainingRun.build(config, out, rt, state, dataset_loader)
        if rt.is_main:
            check_free_space(out, save_bytes(run.trainer.model, config))
            run.announce(precision)
        last_epoch = config.epochs if stop_after is None else min(config.epochs, run.epoch + stop_after)
        metrics: dict[str, Any] = run.history[-1] if run.history else {}
        for epoch in range(run.epoch + 1, last_epoch + 1):
            metrics = run.run_epoch(epoch, progress)
    if rt.world_size > 1 and not keep_process_group:
        dist.destroy_process_group()
    return metrics
