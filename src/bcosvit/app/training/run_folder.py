"""What a run folder holds, and how ``--resume`` reads it back.

A run folder holds ``config.json`` (the resolved configuration, written when the run starts) and,
rewritten atomically after every epoch (``save_run``): ``model.safetensors`` + ``model.json``
(weights used for evaluation, architecture, classes, config, metrics), ``state.pt`` (optimizer,
schedule, EMA, history: what ``--resume`` needs), ``metrics.jsonl`` (one line per epoch) and
``curves.png`` (loss and accuracy). ``load_resume_state`` reads and checks ``state.pt``,
``restore_resume_state`` loads it into a run, ``finished_epochs`` says how far a run got.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ...errors import CheckpointError, ConfigError, InputError
from ...fileio import atomic_write, ensure_writable_dir, open_regular_file
from ...validation import check_fields
from ...weights.checkpoint import save_weights
from .align import AlignmentNet
from .config import TrainConfig
from .distributed import unwrap


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    tested = [h for h in history if "test_top1" in h]  # the epochs validated (eval_every)
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot([h["epoch"] for h in tested], [h["test_loss"] for h in tested], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    if all("train_top1" in h for h in history):  # an alignment stage has no train accuracy (no labels)
        ax_acc.plot(epochs, [h["train_top1"] for h in history], "o-", label="train")
    ax_acc.plot([h["epoch"] for h in tested], [h["test_top1"] for h in tested], "o-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


LOCK_NAME = ".lock"  # a run folder's lock file: it holds the PID of the process writing the folder


@contextlib.contextmanager
def writing_run_folder(out: Path) -> Iterator[None]:
    """Hold the run folder ``out`` (created if need be) for writing: an exclusive ``flock`` on
    ``out/.lock``, which holds this process's PID. A second ``bcosvit train``/``align``/``--resume``
    on the same folder is refused, naming the holder's PID; the kernel releases the lock when its
    process ends, however it ends, so the lock of a killed run never stays behind."""
    ensure_writable_dir(out, "run folder (--out)")
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"{out} is being written by another bcosvit run (PID {holder}); wait for it to end or choose another --out"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def save_bytes(model: nn.Module, config: TrainConfig) -> int:
    """About how many bytes one ``save_run`` writes for ``model`` trained with ``config`` (resolved):
    the weights, then ``state.pt`` with the model, the optimizer's per-parameter state (Adam: two
    tensors, SGD: one) and the EMA. An atomic write holds the new file beside the old one."""
    values = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    slots = 1 if config.optimizer == "sgd" else 2
    return values * (2 + slots + (1 if config.ema else 0)) + 2**20  # and the metrics, curves and metadata


def check_free_space(out: Path, needed: int) -> None:
    """Raise ``ConfigError`` before any work when ``out``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(out).free
    if free < needed:
        raise ConfigError(
            f"{out} has {free / 2**20:,.0f} MiB free, but saving the run needs about {needed / 2**20:,.0f} MiB "
            "each epoch; free some space or choose another --out"
        )


def save_run(
    out: Path,
    model: nn.Module,
    eval_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: AveragedModel | None,
    config: TrainConfig,
    epoch: int,
    history: list[dict[str, Any]],
    classes: list[str],
    extra_state: dict[str, Any] | None = None,
) -> None:
    """Write the weights, metadata, state, metrics and curves of a run after ``epoch``; ``config`` is
    resolved; ``extra_state``: what else ``--resume`` needs (``Trainer.extra_state``).

    Each file is written atomically, the state after the weights: a save that fails (a full disk)
    leaves a consistent folder that ``--resume`` continues, and the ``CheckpointError`` says from
    which epoch."""
    kept = epoch - 1  # the epoch whose state the folder holds
    try:
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
        kept = epoch
        lines = "".join(json.dumps(h) + "\n" for h in history)
        atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))
        _plot_curves(history, out / "curves.png")
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        repeats = f" (it repeats epoch {epoch})" if kept < epoch else ""
        raise CheckpointError(
            f"cannot save epoch {epoch} into {out} ({reason}); the folder keeps the state after epoch "
            f"{kept}: free some space, then continue with --resume{repeats}"
        ) from exc


# Settings that may change when a run is resumed: how long it runs and how it is executed.
_RESUMABLE_CHANGES = (
    "epochs",
    "num_workers",
    "explain_examples",
    "precision",
    "compile",
    "grad_checkpointing",
    "log_every",
    "eval_every",
)


def load_resume_state(out: Path, config: TrainConfig) -> dict[str, Any]:
    """The checked contents of ``out/state.pt``, whose run must have been started with ``config``'s
    settings (``_RESUMABLE_CHANGES`` aside, "auto" compared as resolved); read with
    ``weights_only=True``, so a crafted file cannot run code (only tensors, dicts, lists, tuples,
    numbers and strings are unpickled)."""
    path = out / "state.pt"
    if not path.exists():
        raise CheckpointError(f"--resume: no state.pt in {out}; start a new run without --resume")
    try:
        with open_regular_file(path, "state file") as file:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except InputError as exc:
        raise CheckpointError(f"--resume: {exc}") from exc
    except Exception as exc:  # torch raises many types for a damaged or refused pickle
        raise CheckpointError(
            f"--resume: {path} is corrupt or holds more than tensors and plain values ({exc}); "
            "start a new run in a fresh folder"
        ) from exc
    _check_resume_state(state, path)
    # runs before the recipes stored "auto"; resolving both sides compares what the runs do
    stored = TrainConfig.from_dict(state["config"]).resolved().to_dict()
    current = config.resolved().to_dict()
    differs = sorted(k for k in current if k not in _RESUMABLE_CHANGES and stored.get(k) != current[k])
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
    """Raise ``CheckpointError`` naming the first entry of a loaded ``state.pt`` that ``save_run``
    would not have written (wrong type, missing, or a stored config with invalid values)."""
    check_fields(
        state,
        {**_RESUME_STATE_TYPES, **_OPTIONAL_STATE_TYPES},
        f"--resume: {path}",
        required=tuple(_RESUME_STATE_TYPES),
        allow_unknown=True,
        error=CheckpointError,
        hint="the file was not written by bcosvit train; start a new run in a fresh folder",
    )
    if state["epoch"] < 0 or not all(isinstance(h, dict) for h in state["history"]):
        raise CheckpointError(f"--resume: {path}: 'epoch' or 'history' is invalid; start a new run in a fresh folder")
    try:
        stored = TrainConfig.from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"--resume: {path}: stored 'config' is invalid: {exc}") from exc
    # each finished epoch left one line of history, and a run never passes its own last epoch
    if state["epoch"] > stored.epochs or len(state["history"]) != state["epoch"]:
        raise CheckpointError(
            f"--resume: {path} says {state['epoch']} epochs of {stored.epochs} are done with "
            f"{len(state['history'])} epochs of history: it was not written by bcosvit train; "
            "start a new run in a fresh folder"
        )


def restore_resume_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: AveragedModel | None,
    out: Path,
    align: AlignmentNet | None = None,
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


def finished_epochs(out: str | Path, config: TrainConfig) -> int:
    """The epochs the run in ``out`` has finished (0 where it holds no ``state.pt``); ``ConfigError``
    where that run was started with settings other than ``config``'s (as for ``--resume``)."""
    out = Path(out)
    return int(load_resume_state(out, config)["epoch"]) if (out / "state.pt").exists() else 0
