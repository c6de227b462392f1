"""What limits the grid pointing game of a B-cos ViT: the same models scored with one source of
cross-cell interaction switched off at a time.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/pointing_ablation.py runs/fmnist-bcos_vitc_micro_28 \
        runs/rope30-snapshot/bcos_vitc_micro_28 --threads 1 --json benchmarks/results/pointing_ablation.json

Rows per model (2x2 and 3x3 grids of Fashion-MNIST test images, ``--num-grids`` each, seed 0):

- ``as is``: the exact explanation, as ``bcosvit evaluate`` scores it;
- ``smoothed k``: average-pooled over k x k pixels before the positive part is taken
  (docs/design.md#grid-pointing-game);
- ``per-cell stem norm``: the conv stem's LayerNorm over (C, H, W) takes its statistics per grid
  cell, so the stem sees each cell as it saw single images in training;
- ``block-diagonal attention``: tokens attend only to tokens of their own cell (and the stem norm
  is per cell): what is left is the coupling through the mean-pooled head.
- ``distance penalty s`` (``--distance-penalty``): the trained model with ``s ×`` token distance
  subtracted from every attention score, without any training for it; unlike the rows above it
  needs no knowledge of the cells, so the row also gives the accuracy on the ``--images`` test
  images (the confident images of the pointing game are chosen by the penalised model).

It also reports, on single test images, the positive contribution mass of the true class against
that of the other classes: the ratio a model without any cross-cell interaction would turn into its
pointing score. These are diagnostics that patch the model in place; they are not a scoring protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

import bcosvit
from bcosvit import metrics
from bcosvit.app.data import load_fashion_mnist
from bcosvit.errors import InputError
from bcosvit.fileio import write_json
from bcosvit.layers import DistancePenalty
from bcosvit.layers.attention import Attention
from bcosvit.layers.norm import BcosLayerNorm2d
from bcosvit.weights.checkpoint import load_model


@contextlib.contextmanager
def per_cell_stem_norm(cells: int) -> Iterator[None]:
    """The stem's LayerNorm applied to each grid cell as to a single image."""
    original = BcosLayerNorm2d.forward

    def forward(self: BcosLayerNorm2d, x: Tensor) -> Tensor:
        tiles = rearrange(x, "n c (g1 h) (g2 w) -> (n g1 g2) c h w", g1=cells, g2=cells)
        return rearrange(original(self, tiles), "(n g1 g2) c h w -> n c (g1 h) (g2 w)", g1=cells, g2=cells)

    BcosLayerNorm2d.forward = forward
    try:
        yield
    finally:
        BcosLayerNorm2d.forward = original


@contextlib.contextmanager
def block_diagonal_attention(cells: int) -> Iterator[None]:
    """Every attention layer run on each cell's tokens alone (and the stem norm per cell). Rotary
    scores depend only on offsets, so a cell's tokens keep the scores they have within the grid."""
    original = Attention.forward

    def forward(self: Attention, x: Tensor, grid: tuple[int, int]) -> Tensor:
        h, w = grid[0] // cells, grid[1] // cells
        tokens = rearrange(x, "n (g1 h g2 w) d -> (n g1 g2) (h w) d", g1=cells, g2=cells, h=h, w=w)
        out = original(self, tokens, (h, w))
        return rearrange(out, "(n g1 g2) (h w) d -> n (g1 h g2 w) d", g1=cells, g2=cells, h=h, w=w)

    Attention.forward = forward
    try:
        with per_cell_stem_norm(cells):
            yield
    finally:
        Attention.forward = original


@contextlib.contextmanager
def distance_penalty(model, slope: float) -> Iterator[None]:
    """Every attention layer of ``model`` with ``slope ×`` token distance subtracted from its scores."""
    attentions = [block.attn for block in model.blocks]
    originals = [attn.distance_penalty for attn in attentions]
    penalty = DistancePenalty(slope)  # one module for all layers, as the model builds it
    for attn in attentions:
        attn.distance_penalty = penalty
    try:
        yield
    finally:
        for attn, original in zip(attentions, originals, strict=True):
            attn.distance_penalty = original


def _contributions(model, x, target):
    return bcosvit.explain(model, x, target).contributions[:, 0]  # (N, H, W): the one target per image


def single_image_mass(model, images: Tensor, labels: Tensor) -> dict[str, float]:
    """Mean positive contribution mass of the true class and of every other class on single images."""
    own, other = [], []
    for c in range(model.num_classes):
        mass = _contributions(model, images, torch.full((len(images),), c)).clamp_min(0).flatten(1).sum(1)
        own.append(mass[labels == c])
        other.append(mass[labels != c])
    own_mean, other_mean = torch.cat(own).mean().item(), torch.cat(other).mean().item()
    return {"own_class": own_mean, "other_classes": other_mean, "ratio": own_mean / other_mean}


def _score(model, images, labels, num_grids, confident, grid: int, smooth: int = 0) -> float | None:
    try:
        return metrics.grid_pointing_game(
            model, images, labels, _contributions, grid, num_grids, smooth=smooth, confident=confident
        ).mean
    except InputError:  # too few classes with confident images for this grid size
        return None


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return metrics.topk_accuracy(logits, labels).top1 / 100  # a fraction, like the scores


def _fmt(value: float | None) -> str:
    return f"{value:>6.3f}" if value is not None else f"{'-':>6}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="shipped model names or run folders of B-cos models")
    parser.add_argument("--num-grids", type=int, default=20)
    parser.add_argument("--images", type=int, default=3000, help="first N test images to build grids from")
    parser.add_argument("--smooth", type=int, nargs="*", default=[3, 7])
    parser.add_argument("--distance-penalty", type=float, nargs="*", default=[], help="slopes to apply untrained")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_fashion_mnist("test")
    images, labels = test.images[: args.images].float() / 255, test.labels[: args.images]
    results: dict[str, dict] = {}
    print(f"{'model':<44} {'variant':<26} {'2x2':>6} {'3x3':>6} {'top-1':>6}")
    for name in args.models:
        model = (load_model(name) if Path(name).exists() else bcosvit.create_model(name, pretrained=True)).eval()
        logits = metrics.predict_logits(model, images)
        confident = metrics.confident_images_by_class(model, images, labels, logits=logits)

        score = functools.partial(_score, model, images, labels, args.num_grids, confident)

        rows: dict[str, dict[str, float | None]] = {"as is": {"top1": _accuracy(logits, labels)}}
        for grid in (2, 3):
            rows["as is"][f"{grid}x{grid}"] = score(grid)
            for k in args.smooth:
                rows.setdefault(f"smoothed {k}", {})[f"{grid}x{grid}"] = score(grid, k)
            with per_cell_stem_norm(grid):
                rows.setdefault("per-cell stem norm", {})[f"{grid}x{grid}"] = score(grid)
            with block_diagonal_attention(grid):
                rows.setdefault("block-diagonal attention", {})[f"{grid}x{grid}"] = score(grid)
        for slope in args.distance_penalty:
            with distance_penalty(model, slope):
                logits = metrics.predict_logits(model, images)
                penalised = metrics.confident_images_by_class(model, images, labels, logits=logits)
                row = rows[f"distance penalty {slope:g}"] = {"top1": _accuracy(logits, labels)}
                for grid in (2, 3):
                    row[f"{grid}x{grid}"] = _score(model, images, labels, args.num_grids, penalised, grid)
        for variant, row in rows.items():
            print(f"{name:<44} {variant:<26} {_fmt(row['2x2'])} {_fmt(row['3x3'])} {_fmt(row.get('top1'))}", flush=True)
        mass = single_image_mass(model, images[:512], labels[:512])
        print(
            f"{name:<44} single images: positive mass own class {mass['own_class']:.3f}, "
            f"other classes {mass['other_classes']:.3f} (ratio {mass['ratio']:.1f})",
            flush=True,
        )
        results[name] = {"pointing": rows, "single_image_positive_mass": mass}
    if args.json:
        payload = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "num_grids": args.num_grids,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
