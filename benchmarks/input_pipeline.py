"""Training input pipeline of folder datasets: images/s per worker core at 224 px, new vs old.

    .venv/bin/python benchmarks/input_pipeline.py --json benchmarks/results/input_pipeline.json

On a synthetic ImageNet-layout tree (``tests/imagenet_tree.py``: JPEGs of ImageNet-like sizes,
300-500 px a side by default), one DataLoader worker process (``num_workers=1``) feeds batches of
32 to the main process, which only receives them; the worker is persistent, as in training. The
rate per worker core is images per second of the worker's CPU time (``/proc/<pid>/schedstat``),
which other processes on a shared machine change less than the wall-clock rate, reported beside
it. Side by side in one run, each repeat timing one pass of every pipeline in turn (so a change
of load hits all of them), the median of ``--repeats``:

* old: what the folder training pipeline was before issue 25 (torchvision's PIL loader,
  ``ToImage``, random resized crop, flip, RandAugment on tensors, ``ToDtype(float32)``: float32
  crosses the pipe; ``default_collate``);
* new: ``bcosvit.app.data.load_dataset("folder", "train", ...)`` and the training loader's
  ``collate_images``, as shipped (crop and flip on the uint8 tensor, RandAugment on a PIL image,
  uint8 across the pipe, batches in the images' channels-last memory);
* all PIL: crop, flip and RandAugment all on the PIL image, ``ToImage`` last, ``collate_images``
  (the alternative the new pipeline was measured against).

Also: the bytes per image that cross the worker pipe, the cost of each step on either backend
(in-process, one thread, mean over the tree's images), and the share of random crops for which
PIL's JPEG draft mode could decode at half scale or less (the crop still at least ``image_size``
pixels a side). Target: new >= 2x old per worker core in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets.folder import default_loader
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/imagenet_tree.py

from bcosvit.app.data import ChannelsLastRandomResizedCrop, FolderDataset, load_dataset  # noqa: E402
from bcosvit.app.loading import collate_images  # noqa: E402
from bcosvit.fileio import atomic_write  # noqa: E402
from tests.imagenet_tree import make_imagenet_tree  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "input_pipeline.json"
TARGET_SPEEDUP = 2.0


def old_transform(image_size: int, magnitude: int) -> v2.Compose:
    """The folder training chain before issue 25, rebuilt: augmentation on tensors, float32 out."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(magnitude=magnitude),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def all_pil_transform(image_size: int, magnitude: int) -> v2.Compose:
    """Every augmentation on the PIL image (Pillow's uint8 operations), ``ToImage`` last."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(magnitude=magnitude),
            v2.ToImage(),
            v2.ToPureTensor(),
        ]
    )


def pipelines(tree: Path, image_size: int, magnitude: int) -> dict[str, tuple[Dataset, Callable]]:
    """The train split of ``tree`` through each pipeline measured, with the collate function of its loader."""
    folder = tree / "train"
    new, _ = load_dataset("folder", "train", tree, image_size, True, randaugment=magnitude)
    return {
        "old": (FolderDataset(folder, old_transform(image_size, magnitude), default_loader), default_collate),
        "new": (new, collate_images),
        "all PIL": (FolderDataset(folder, all_pil_transform(image_size, magnitude)), collate_images),
    }


def record_pid(shared: Any, worker_id: int) -> None:
    """``worker_init_fn``: the worker's process id into ``shared`` (a ``multiprocessing.Value``)."""
    shared.value = os.getpid()


def one_worker_loader(dataset: Dataset, collate: Callable, batch_size: int) -> tuple[DataLoader, Any]:
    """One persistent worker process, shuffled with a fixed seed; and where its process id will be."""
    generator = torch.Generator().manual_seed(0)
    pid = multiprocessing.Value("i", 0)
    loader = DataLoader(
        dataset,
        batch_size,
        shuffle=True,
        generator=generator,
        num_workers=1,
        persistent_workers=True,
        drop_last=True,
        collate_fn=collate,
        worker_init_fn=functools.partial(record_pid, pid),
    )
    return loader, pid


def cpu_seconds(pid: int) -> float:
    """The CPU seconds process ``pid`` has run: its main thread's (where a DataLoader worker does its
    work) from ``/proc/<pid>/schedstat`` (ns), else all its threads' from ``/proc/<pid>/stat`` (ticks)."""
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def timed_pass(loader: DataLoader, pid: Any) -> tuple[float, float, int]:
    """Wall-clock seconds and the worker's CPU seconds for one pass over ``loader`` (whose worker is
    running), and the number of images it delivered."""
    before, started, count = cpu_seconds(pid.value), time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)
    return time.perf_counter() - started, cpu_seconds(pid.value) - before, count


def bytes_per_image(loader: DataLoader) -> int:
    """The bytes of one image in a batch as it crosses the worker pipe."""
    images, _ = next(iter(loader))
    return images[0].numel() * images.element_size()


def measure_rates(
    datasets: dict[str, tuple[Dataset, Callable]], batch_size: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Images per worker-CPU second and per wall second of each pipeline, every repeat one pass of each in turn."""
    loaders = {name: one_worker_loader(ds, collate, batch_size) for name, (ds, collate) in datasets.items()}
    results: dict[str, dict[str, Any]] = {}
    for name, (loader, _) in loaders.items():
        results[name] = {"per_core": [], "wall": [], "bytes_per_image": bytes_per_image(loader)}  # starts the worker
    for loader, pid in loaders.values():
        timed_pass(loader, pid)  # warms the page cache and the worker's allocator
    for repeat in range(repeats):
        for name, (loader, pid) in loaders.items():
            wall, worker, count = timed_pass(loader, pid)
            results[name]["per_core"].append(count / worker)
            results[name]["wall"].append(count / wall)
        log(
            f"repeat {repeat + 1}/{repeats}, images per worker-CPU second: "
            + ", ".join(f"{name} {result['per_core'][-1]:.0f}" for name, result in results.items())
        )
    for result in results.values():
        result["images_per_core_s"] = statistics.median(result["per_core"])
        result["images_per_wall_s"] = statistics.median(result["wall"])
    return results


def mean_ms(step: Callable[[Any], Any], inputs: list[Any]) -> float:
    """Mean milliseconds of ``step`` over ``inputs``, one call each (what a pass over them costs)."""
    started = time.perf_counter()
    for item in inputs:
        step(item)
    return 1000 * (time.perf_counter() - started) / len(inputs)


def stage_costs(files: list[str], image_size: int, magnitude: int, batch_size: int) -> dict[str, float]:
    """Mean ms per image of each step on either backend, in this process on one thread."""
    torch.manual_seed(0)
    decoded = [Image.open(path).convert("RGB") for path in files]
    tensors = [v2.functional.to_image(image) for image in decoded]
    crop = v2.RandomResizedCrop(image_size, antialias=True)
    channels_last_crop = ChannelsLastRandomResizedCrop(image_size, antialias=True)
    crops_pil = [crop(image) for image in decoded]
    crops_tensor = [v2.functional.to_image(image) for image in crops_pil]  # (C, H, W) views of (H, W, C) memory
    randaugment = v2.RandAugment(magnitude=magnitude)
    batches = [list(zip(crops_tensor[i : i + batch_size], range(batch_size))) for i in range(0, len(files), batch_size)]
    per_batch = len(files) / len(batches)
    return {
        "decode (PIL, RGB)": mean_ms(lambda path: Image.open(path).convert("RGB"), files),
        "PIL -> uint8 tensor": mean_ms(v2.functional.to_image, decoded),
        "random resized crop, uint8 tensor": mean_ms(crop, tensors),
        "random resized crop, PIL crop + uint8 tensor resize (new)": mean_ms(channels_last_crop, decoded),
        "random resized crop, PIL": mean_ms(crop, decoded),
        "RandAugment, uint8 tensor": mean_ms(randaugment, crops_tensor),
        "RandAugment, PIL": mean_ms(randaugment, crops_pil),
        "tensor -> PIL -> tensor": mean_ms(
            lambda x: v2.functional.pil_to_tensor(v2.functional.to_pil_image(x)), crops_tensor
        ),
        "to float32 (old, in the worker)": mean_ms(
            lambda x: v2.functional.to_dtype(x, torch.float32, scale=True), crops_tensor
        ),
        "batching, (B, C, H, W)-contiguous (default_collate)": mean_ms(default_collate, batches) / per_batch,
        "batching, channels-last (collate_images)": mean_ms(collate_images, batches) / per_batch,
    }


def draft_eligible_share(files: list[str], image_size: int, draws: int = 20) -> float:
    """The share of random resized crops (``draws`` per image) whose shorter side is at least twice
    ``image_size``: those a JPEG decoded at half scale (PIL's draft mode) could still fill."""
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(image_size, antialias=True)
    eligible = total = 0
    for path in files:
        with Image.open(path) as image:
            width, height = image.size
        for _ in range(draws):
            params = crop.make_params([torch.empty(3, height, width, dtype=torch.uint8)])
            eligible += min(params["height"], params["width"]) >= 2 * image_size
            total += 1
    return eligible / total


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """``/proc/cpuinfo``'s model name and which of avx2, avx512_bf16 and the AMX flags it lists."""
    model, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    return model, [flag for flag in wanted if flag in flags]


def machine_info() -> dict[str, Any]:
    model, flags = cpu_model_and_flags()
    info: dict[str, Any] = {
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "pillow_version": PIL.__version__,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    return info


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report(results: dict[str, dict[str, Any]], costs: dict[str, float], draft: float, info: dict[str, Any]) -> str:
    old = results["old"]["images_per_core_s"]
    lines = [
        f"machine: {info['cpu_model']} ({', '.join(info['cpu_flags']) or 'no avx2'}), {info['cpu_count']} cores, "
        f"torch {info['torch_version']}, torchvision {info['torchvision_version']}, Pillow {info['pillow_version']}, "
        f"load average {info.get('load_average_1_5_15min', ['?'])[0]}",
        "",
        f"{'pipeline':10s} {'images/s per worker core':>25s} {'vs old':>8s} {'images/s wall':>14s} "
        f"{'bytes/image in the pipe':>24s}",
    ]
    for name, result in results.items():
        rate, wall = result["images_per_core_s"], result["images_per_wall_s"]
        lines.append(f"{name:10s} {rate:25.0f} {rate / old:7.2f}x {wall:14.0f} {result['bytes_per_image']:24,d}")
    lines += ["", "step costs, ms per image (mean, one thread, in-process):"]
    lines += [f"  {name:55s} {ms:6.3f}" for name, ms in costs.items()]
    lines.append(f"\nrandom crops a half-scale JPEG decode (PIL draft) could serve: {100 * draft:.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="training images in the synthetic tree")
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--sizes", type=int, nargs=2, default=(300, 500), help="smallest and largest side, px")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--magnitude", type=int, default=9, help="RandAugment magnitude")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tree", type=Path, help="an existing ImageNet-layout tree (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as scratch:
        tree = args.tree
        if tree is None:
            per_class = max(1, args.images // args.classes)
            log(f"writing {per_class * args.classes} JPEGs of {args.sizes[0]}-{args.sizes[1]} px ...")
            tree = make_imagenet_tree(
                scratch, args.classes, per_class, sizes=tuple(args.sizes), seed=0, splits=("train",)
            )
        datasets = pipelines(tree, args.image_size, args.magnitude)
        old_dataset = datasets["old"][0]
        files = [old_dataset.path(i) for i in range(len(old_dataset))]
        results = measure_rates(datasets, args.batch_size, args.repeats)
        costs = stage_costs(files, args.image_size, args.magnitude, args.batch_size)
        draft = draft_eligible_share(files, args.image_size)
    info = machine_info()
    print(report(results, costs, draft, info))
    speedup = results["new"]["images_per_core_s"] / results["old"]["images_per_core_s"]
    per_repeat = [new / old for new, old in zip(results["new"]["per_core"], results["old"]["per_core"], strict=True)]
    passed = speedup >= TARGET_SPEEDUP
    print(
        f"\ntarget: new >= {TARGET_SPEEDUP:g}x old per worker core: {speedup:.2f}x (repeats "
        f"{min(per_repeat):.2f}-{max(per_repeat):.2f}x), {'met' if passed else 'NOT met'}"
    )
    record = {
        "command": "python benchmarks/input_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "images": len(files),
        "machine": info,
        "pipelines": results,
        "step_costs_ms": costs,
        "draft_eligible_share": draft,
        "speedup_new_vs_old": speedup,
        "speedup_per_repeat": per_repeat,
        "target": {"speedup_at_least": TARGET_SPEEDUP, "passed": passed},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
