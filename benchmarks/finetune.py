"""Fine-tuning a 224-px ViT-Ti/16, B-cos and its standard twin, on a 10-class folder dataset (issue 28).

Reproduce (from the repository root; about 8 minutes on 2 quiet CPU cores)::

    .venv/bin/python benchmarks/finetune.py --layer-decay none --epochs 6 --json benchmarks/results/finetune.json

What it does, as a user would with the packaged ``finetune`` recipe:

- the sources: the reference implementation's (``bcos`` 0.1.3) ``simple_vit_ti_patch16_224`` and
  ``standard_simple_vit_ti_patch16_224`` at their random initialisation (the published ImageNet
  weights cannot be downloaded here), converted (``convert_official``: the models of the published
  files, 1000 classes) and saved as ``.safetensors`` files; ``--source random`` takes bcosvit's own
  random ``bcos_vit_tiny_patch16_224`` / ``vit_tiny_patch16_224`` instead. Neither has learned
  anything: the run measures that fine-tuning is stable and learns from the first step, not what
  ImageNet features bring;
- the data: a folder tree (``<tmp>/train/<class>/*.png``, ``<tmp>/val/<class>/*.png``) of
  ``--train-per-class`` Fashion-MNIST training and ``--val-per-class`` test images per class, each
  resized to 224 px and written as 3-channel PNGs;
- each model: ``bcosvit train --recipe finetune --finetune-from SOURCE --dataset folder`` (through
  ``load_recipe`` and ``run_recipe``) with a new 10-class head, the recipe's lr and layer decay
  (``--layer-decay none``: every layer at lr, which suits a random source, whose lower layers have
  everything to learn), ``--epochs``, ``--batch-size`` and ``--warmup-steps`` of this script,
  precision "auto"; every step's loss is recorded (a wrapper around ``Trainer.step`` that reads it:
  one wait per step).

Reported per model: the loss of the first step and the mean of the first and last 10 steps, whether
any loss was not finite, the validation top-1 after each epoch, time and speed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from throughput import log, machine_info, machine_line, positive_int, run_record, write_results

from bcosvit.app.data import load_fashion_mnist
from bcosvit.app.training import load_recipe
from bcosvit.app.training.runner import run_recipe
from bcosvit.app.training.step import StepSums, Trainer
from bcosvit.weights import create_model
from bcosvit.weights.checkpoint import save_weights
from bcosvit.weights.convert import convert_official

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "finetune.json"
MODELS = ("bcos_vit_tiny_patch16_224", "vit_tiny_patch16_224")
# each model and the reference's entry point of the same architecture (bcosvit.weights.published)
REFERENCE = {
    "bcos_vit_tiny_patch16_224": "simple_vit_ti_patch16_224",
    "vit_tiny_patch16_224": "standard_simple_vit_ti_patch16_224",
}
SIZE = 224


def write_folder_tree(root: Path, data_dir: str | None, train_per_class: int, val_per_class: int) -> list[str]:
    """The first ``train_per_class`` training and ``val_per_class`` test images of each Fashion-MNIST
    class, resized to ``SIZE`` px (bilinear) as RGB PNGs under ``root/{train,val}/<class>/``; returns
    the class folder names (the class names with ``/`` replaced)."""
    folders: list[str] = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        ds = load_fashion_mnist("train" if split == "train" else "test", data_dir)
        folders = [name.replace("/", "-") for name in ds.classes]
        taken = [0] * len(folders)
        for image, label in zip(ds.images, ds.labels.tolist()):
            if taken[label] >= per_class:
                continue
            folder = root / split / folders[label]
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(image[0].numpy()).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
            picture.save(folder / f"{taken[label]:04d}.png")
            taken[label] += 1
        if min(taken) < per_class:
            raise SystemExit(f"Fashion-MNIST {split} has only {min(taken)} images of some class")
    return folders


def source_model(name: str, kind: str) -> torch.nn.Module:
    """The 1000-class source of ``name``: the reference's random model converted, or bcosvit's own random one."""
    if kind == "random":
        return create_model(name)
    from bcos.models import pretrained

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = getattr(pretrained, REFERENCE[name])(pretrained=False)
    return convert_official(reference.state_dict(), name)


class StepLosses:
    """Records every training step's mean loss (a wrapper around ``Trainer.step``; reads the loss
    on the host, so each step waits for its device)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self._step = Trainer.step

    def __enter__(self) -> StepLosses:
        record, step = self.losses, self._step

        def recorded(trainer: Trainer, images, labels, index: int) -> StepSums:
            sums = step(trainer, images, labels, index)
            record.append(float(sums.loss) / sums.count)
            return sums

        Trainer.step = recorded  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Trainer.step = self._step  # type: ignore[method-assign]


def finetune_row(name: str, source: Path, tree: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Fine-tune ``source`` (the weights of ``name``) on ``tree`` with the ``finetune`` recipe; the row."""
    settings = {
        "finetune_from": str(source),
        "finetune_pretrained": "auto",
        "model": name,
        "dataset": "folder",
        "data_dir": str(tree),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "explain_examples": False,
        "log_every": 10,
        "seed": args.seed,
    }
    if args.layer_decay is not None:
        settings["layer_decay"] = None if args.layer_decay == "none" else float(args.layer_decay)
    recipe = load_recipe("finetune", settings)
    config = recipe.stages[0].config
    started = time.perf_counter()
    with StepLosses() as recorded:
        run_recipe(recipe, out, progress=False)
    seconds = time.perf_counter() - started
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = recorded.losses
    finite = all(math.isfinite(x) for x in losses)
    resolved = json.loads((out / "config.json").read_text())
    return {
        "model": name,
        "family": "B-cos" if name.startswith("bcos_") else "standard",
        "loss": resolved["loss"],
        "optimizer": resolved["optimizer"],
        "precision": resolved["precision"],
        "lr": config.lr,
        "layer_decay": config.layer_decay,
        "steps": len(losses),
        "first_loss": losses[0],
        "first10_loss": sum(losses[:10]) / len(losses[:10]),
        "last10_loss": sum(losses[-10:]) / len(losses[-10:]),
        "all_finite": finite,
        "step_losses": losses,
        "val_top1_per_epoch": [e.get("test_top1") for e in epochs],
        "val_top1": epochs[-1]["test_top1"],
        "val_top5": epochs[-1]["test_top5"],
        "train_top1_last_epoch": epochs[-1]["train_top1"],
        "seconds": seconds,
        "train_images_per_s": sum(e["train_images_per_s"] for e in epochs) / len(epochs),
    }


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    header = (
        f"{'model':28s} {'loss':>4s} {'decay':>5s} {'steps':>5s} {'step 1':>7s} {'first 10':>8s} {'last 10':>8s} "
        f"{'finite':>6s}  {'val top-1 by epoch (%)':24s} {'time':>6s} {'img/s':>6s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        accuracy = " ".join(f"{a:.1f}" for a in r["val_top1_per_epoch"])
        print(
            f"{r['model']:28s} {r['loss']:>4s} {r['layer_decay'] or 'none':>5} "
            f"{r['steps']:5d} {r['first_loss']:7.4f} {r['first10_loss']:8.4f} "
            f"{r['last10_loss']:8.4f} {'yes' if r['all_finite'] else 'NO':>6s}  {accuracy:24s} "
            f"{r['seconds']:5.0f}s {r['train_images_per_s']:6.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--source", choices=("reference", "random"), default="reference")
    parser.add_argument("--data-dir", help="Fashion-MNIST's idx files (default: the Debian package's)")
    parser.add_argument("--train-per-class", type=positive_int, default=100)
    parser.add_argument("--val-per-class", type=positive_int, default=50)
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument(
        "--layer-decay", help="replaces the recipe's (0.75): a factor in (0, 1], or 'none' (every layer at lr)"
    )
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bcosvit-finetune-") as tmp:
        tree = Path(tmp) / "fmnist-folder"
        classes = write_folder_tree(tree, args.data_dir, args.train_per_class, args.val_per_class)
        log(f"wrote {tree}: {len(classes)} classes, {args.train_per_class} train / {args.val_per_class} val each")
        for name in args.models:
            source = Path(tmp) / f"{name}-source.safetensors"
            torch.manual_seed(args.seed)
            save_weights(source_model(name, args.source), source, {"model_name": name})
            log(f"{name}: source {args.source} (1000 classes) -> {source.name}; fine-tuning")
            rows.append(finetune_row(name, source, tree, args, Path(tmp) / f"run-{name}"))
    info = machine_info()
    print_table(rows)
    print(machine_line(info))
    data = {
        "benchmark": "finetune",
        **run_record(args, argv),
        "machine": info,
        "source": (
            "the reference's (bcos 0.1.3) random initialisation, converted (convert_official)"
            if args.source == "reference"
            else "bcosvit's random initialisation"
        ),
        "data": f"Fashion-MNIST as a folder tree: {args.train_per_class} train (from its training set) / "
        f"{args.val_per_class} val (from its test set) images per class, resized to {SIZE} px, RGB PNG",
        "rows": rows,
    }
    write_results(args.json, data)
    log(f"wrote {args.json}")
    return 0 if all(r["all_finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
