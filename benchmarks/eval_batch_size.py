"""How many images per pass ``bcosvit evaluate`` should send through the shipped micro models.

Reproduce (from the repository root, both cores free)::

    .venv/bin/python benchmarks/eval_batch_size.py --json benchmarks/results/eval_batch_size.json

For each shipped model and batch size, median seconds over ``--repeats`` interleaved repeats of the
two workloads that dominate an evaluation:

- ``IG 3x3``: integrated gradients (10 steps, one quadrature step of a batch per pass) on 64 3×3
  canvases (84×84) tiled from Fashion-MNIST test images, as in the 3×3 pointing game;
- ``deletion``: one deletion curve (20 steps, black baseline, random ranking) on 256 test images.

The ratio column divides by the time at batch size 64, the evaluation's batch size before it moved
to 32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from einops import rearrange
from throughput import machine_info, machine_line

import bcosvit
from bcosvit.app.data import load_fashion_mnist
from bcosvit.attribution import attribute
from bcosvit.fileio import write_json
from bcosvit.metrics import deletion_insertion

MODELS = ("bcos_vitc_micro_28", "vitc_micro_28")


def integrated_gradients_on_canvases(model, canvases, target, batch_size: int) -> None:
    for start in range(0, len(canvases), batch_size):
        part = slice(start, start + batch_size)
        x, t = canvases[part], target[part]
        attribute("integrated_gradients", model, x, t, n_steps=10, internal_batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    test = load_fashion_mnist("test")
    images = test.images[:576].float() / 255
    canvases = rearrange(images, "(n g1 g2) c h w -> n c (g1 h) (g2 w)", g1=3, g2=3)  # (64, 1, 84, 84)
    canvas_target = test.labels[:576:9]
    curve_images, maps = images[:256], torch.rand(256, 28, 28, generator=torch.Generator().manual_seed(0))
    models = {name: bcosvit.create_model(name, pretrained=True).eval() for name in MODELS}
    workloads = {
        "IG 3x3": lambda m, b: integrated_gradients_on_canvases(m, canvases, canvas_target, b),
        "deletion": lambda m, b: deletion_insertion(m, curve_images, test.labels[:256], maps, batch_size=b),
    }
    seconds: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            for workload, run in workloads.items():
                for batch in args.batch_sizes:
                    start = time.perf_counter()
                    run(model, batch)
                    seconds.setdefault((name, workload, batch), []).append(time.perf_counter() - start)

    info = machine_info()
    print(machine_line(info))
    print(f"{'model':20s} {'workload':10s} {'batch':>5s} {'median s':>9s} {'vs 64':>6s}  repeats")
    rows = []
    for (name, workload, batch), times in seconds.items():
        median = statistics.median(times)
        reference = seconds.get((name, workload, 64))
        ratio = median / statistics.median(reference) if reference else float("nan")
        rows.append(
            {"model": name, "workload": workload, "batch_size": batch, "median_s": median, "ratio_to_64": ratio}
            | {"seconds": times}
        )
        print(f"{name:20s} {workload:10s} {batch:5d} {median:9.2f} {ratio:6.2f}  {[round(t, 2) for t in times]}")
    if args.json:
        write_json(args.json, {"machine": info, "repeats": args.repeats, "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
