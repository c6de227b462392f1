"""``bcosvit evaluate`` at growing test-set sizes: peak memory and images/s.

    .venv/bin/python benchmarks/evaluate_scale.py --json benchmarks/results/evaluate_scale.json

For each ``N`` of ``--counts`` (default 500, 2 000, 8 000), a synthetic ImageNet-layout validation
folder of ``N`` small JPEGs (``tests/imagenet_tree.py``: 20 WordNet-id classes, 128-150 px a side)
is evaluated by ``bcosvit evaluate`` in a new interpreter of its own, with a one-block, 128-wide standard
1000-class model for 112-pixel inputs (resized to 128, centre crop) whose head is fitted to the
classes (so that the grid pointing game has confident images to draw from): the whole protocol
(accuracy, 2x2 and 3x3 pointing game, deletion and insertion, figures, report) with two methods and
the default workers and precision. Reported per N: the peak resident memory of the evaluating
process (``ru_maxrss``), what the evaluation before issue 25 held on top of it (every test image as
float32, ``N · 3 · 112² · 4`` bytes, once), the accuracy pass's images/s (``metrics.json``) and the
command's wall time.

Target: the peak grows by at most 10 % from the first N to the last (at 224 px the old evaluation
held 602 kB per image, about 60 GB for ImageNet's 50 000 validation images).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "src")]  # tests/ helpers, and this tree's bcosvit

from throughput import machine_info, machine_line  # noqa: E402

from bcosvit.fileio import write_json  # noqa: E402
from tests.imagenet_tree import make_imagenet_tree  # noqa: E402
from tests.test_evaluate_scale import fitted_imagenet_run  # noqa: E402

MAX_GROWTH = 0.10  # of the peak resident memory, from the first count to the last
CLASSES = 20
IMAGE_SIZE, RESIZE_SIZE, PATCH_SIZE = 112, 128, 16
JPEG_SIDES = (128, 150)
SETTINGS = [
    "--methods", "gradient", "integrated_gradients", "--ig-steps", "4",
    "--grids", "10", "--faithfulness-images", "32",
]  # fmt: skip
# Runs the command, then prints the peak resident memory of its process (not its children's: a
# forked child starts with its parent's pages).
PEAK_CODE = (
    "import resource, sys\n"
    "from bcosvit.app.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(f'PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}')\n"
    "sys.exit(code)\n"
)


def cpuinfo_flags(names: tuple[str, ...] = ("avx2", "avx512_bf16", "amx_tile", "amx_bf16")) -> dict[str, bool]:
    """Which of ``names`` the first CPU of ``/proc/cpuinfo`` lists among its flags."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return {name: name in flags for name in names}
    return dict.fromkeys(names, False)


def evaluate_once(run: Path, val: Path, out: Path) -> dict[str, Any]:
    """``bcosvit evaluate`` of ``run`` on ``val`` in a new interpreter: its peak memory, wall time and
    what its log and ``metrics.json`` say about the accuracy pass."""
    args = ["evaluate", "--checkpoint", str(run), "--dataset", "folder", "--data-dir", str(val), *SETTINGS]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK_CODE, *args, "--out", str(out)], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"bcosvit evaluate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak = int(next(line for line in done.stdout.splitlines() if line.startswith("PEAK")).split()[1])
    metrics = json.loads((out / "metrics.json").read_text())
    model = metrics["models"][0]
    return {
        "images": metrics["num_test_images"],
        "peak_rss_mb": peak / 2**20,
        "held_by_the_old_code_mb": metrics["num_test_images"] * 3 * IMAGE_SIZE**2 * 4 / 2**20,
        "accuracy_pass_images_per_s": model["accuracy_pass_images_per_s"],
        "top1": model["accuracy"]["top1"],
        "grids_drawn": sorted(k for k in model["methods"]["gradient"] if k.startswith("grid")),
        "wall_seconds": seconds,
        "device": metrics["device"],
        "precision": metrics["precision"],
        "workers_per_process": metrics["workers_per_process"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bcosvit-evaluate-scale-") as tmp:
        root = Path(tmp)
        trees = {
            n: make_imagenet_tree(
                root / f"n{n}", CLASSES, val_per_class=n // CLASSES, sizes=JPEG_SIDES, splits=("val",)
            )
            for n in args.counts
        }
        first = trees[args.counts[0]] / "val"
        run = fitted_imagenet_run(
            first, root / "run", IMAGE_SIZE, RESIZE_SIZE, per_class=3, patch_size=PATCH_SIZE, embed_dim=128
        )
        for n, tree in trees.items():
            row = evaluate_once(run, tree / "val", root / f"out{n}")
            rows.append(row)
            print(
                f"N = {row['images']:5d}: peak RSS {row['peak_rss_mb']:7.1f} MB, accuracy pass "
                f"{row['accuracy_pass_images_per_s']:6.0f} images/s, evaluate {row['wall_seconds']:5.1f} s "
                f"({', '.join(row['grids_drawn'])}; top-1 {row['top1']:.1f} %)",
                flush=True,
            )
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
    passed = growth <= MAX_GROWTH
    info = {**machine_info(), "cpuinfo_flags": cpuinfo_flags()}
    print()
    print(f"{'N':>6} {'peak RSS (MB)':>14} {'old code: + (MB)':>17} {'pass images/s':>14} {'evaluate (s)':>13}")
    for row in rows:
        print(
            f"{row['images']:>6} {row['peak_rss_mb']:>14.1f} {row['held_by_the_old_code_mb']:>17.0f} "
            f"{row['accuracy_pass_images_per_s']:>14.0f} {row['wall_seconds']:>13.1f}"
        )
    print(
        f"peak RSS growth from N = {rows[0]['images']} to {rows[-1]['images']}: {100 * growth:+.1f} % "
        f"(target <= {100 * MAX_GROWTH:.0f} %: {'passed' if passed else 'FAILED'})"
    )
    first = rows[0]
    print(
        f"{first['device']}, accuracy pass in {first['precision']['accuracy']}, {first['workers_per_process']} workers"
    )
    print(machine_line(info) + f"; /proc/cpuinfo flags: {info['cpuinfo_flags']}")
    if args.json:
        target = {"target": f"peak RSS growth <= {100 * MAX_GROWTH:.0f} %", "value": growth, "passed": passed}
        write_json(args.json, {"machine": info, "settings": SETTINGS, "rows": rows, "targets": [target]})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
