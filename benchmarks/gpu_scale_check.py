"""The GPU check of issue 25, prepared to run as one script where a GPU is lent:

    .venv/bin/python benchmarks/gpu_scale_check.py --json benchmarks/results/gpu_scale_check.json

1. writes a synthetic ImageNet-layout tree (``tests/imagenet_tree.py``: ``--classes`` WordNet-id
   classes, JPEGs of 300-500 px a side, as ImageNet's);
2. times the training input pipeline alone: the run's own train loader (``--workers`` persistent
   workers, uint8 batches, pinned on CUDA) iterated without a model, in images/s;
3. trains ``--model`` (default ``bcos_vit_small_patch16_224``) for ``--steps`` steps with the
   ``imagenet`` recipe's settings in bf16 with ``torch.compile`` (``bcosvit.app.training.train``),
   sampling the GPU's utilisation with ``nvidia-smi`` meanwhile;
4. evaluates the run on the tree's val folder (``bcosvit evaluate``: streamed, on the GPU).

Prints and writes: the pipeline's images/s, the training images/s (epoch time, compile included,
and the steady rate from the second epoch on), the mean GPU utilisation while training, whether
the pipeline keeps up (its rate above the training rate), the evaluation's accuracy-pass images/s
and time. Without a GPU it runs on the CPU with ``--steps`` as given (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "src")]  # tests/ helpers, and this tree's bcosvit

import torch  # noqa: E402
from throughput import machine_info, machine_line  # noqa: E402

from bcosvit.app.cli import main as bcosvit_main  # noqa: E402
from bcosvit.app.training import load_recipe, train  # noqa: E402
from bcosvit.app.training.builders import build_data  # noqa: E402
from bcosvit.app.training.distributed import Runtime  # noqa: E402
from bcosvit.fileio import write_json  # noqa: E402
from tests.imagenet_tree import make_imagenet_tree  # noqa: E402


@contextlib.contextmanager
def gpu_utilisation(samples: list[float]):
    """Sample ``nvidia-smi``'s GPU utilisation (%) every 200 ms into ``samples`` while the block runs."""
    if shutil.which("nvidia-smi") is None or not torch.cuda.is_available():
        yield
        return
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200", "-i", "0"]
    process = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=10)
        samples.extend(float(line) for line in out.split() if line.strip().replace(".", "", 1).isdigit())


def pipeline_rate(config: Any, device: torch.device, batches: int) -> float:
    """Images/s of the run's train loader alone (first batch, the workers' start, excluded)."""
    data = build_data(config, Runtime(0, 1, device))
    loader = iter(data.train_loader)
    next(loader)
    started, seen = time.perf_counter(), 0
    for _, (images, _) in zip(range(batches), loader):
        images = images.to(device, non_blocking=True)
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work or tempfile.mkdtemp(prefix="bcosvit-gpu-check-"))
    per_class = -(-args.steps * args.batch_size // args.epochs // args.classes)  # enough for the steps
    tree = make_imagenet_tree(work / "tree", args.classes, per_class, args.val_per_class, sizes=(300, 500))
    settings = {
        "model": args.model,
        "data_dir": str(tree),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "warmup_steps": max(1, args.steps // 10),
        "num_workers": args.workers,
        "precision": args.precision,
        "compile": not args.no_compile,
        "explain_examples": False,
    }
    (folder, config), *_ = load_recipe("imagenet", settings).runs(work / "run")
    pipeline = pipeline_rate(config, device, args.pipeline_batches)
    utilisation: list[float] = []
    started = time.perf_counter()
    with gpu_utilisation(utilisation):
        metrics = train(config, folder, progress=False)
    train_seconds = time.perf_counter() - started
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steady = [h["train_images_per_s"] for h in history[1:]] or [history[-1]["train_images_per_s"]]
    evaluation = work / "evaluation"
    code = bcosvit_main(
        ["evaluate", "--checkpoint", str(folder), "--dataset", "folder", "--data-dir", str(tree / "val")]
        + ["--methods", "bcos", "gradient", "--grids", "10", "--faithfulness-images", "64", "--out", str(evaluation)]
    )
    evaluated = json.loads((evaluation / "metrics.json").read_text()) if code == 0 else {}
    model_result = (evaluated.get("models") or [{}])[0]
    result = {
        "machine": machine_info(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "settings": vars(args),
        "pipeline_images_per_s": pipeline,
        "train_images_per_s_first_epoch": history[0]["train_images_per_s"],
        "train_images_per_s_steady": sum(steady) / len(steady),
        "train_seconds": train_seconds,
        "gpu_utilisation_mean": sum(utilisation) / len(utilisation) if utilisation else None,
        "pipeline_keeps_up": pipeline > sum(steady) / len(steady),
        "final_metrics": metrics,
        "evaluate_exit_code": code,
        "evaluate_accuracy_pass_images_per_s": model_result.get("accuracy_pass_images_per_s"),
        "evaluate_seconds": evaluated.get("seconds"),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bcos_vit_small_patch16_224")
    parser.add_argument("--steps", type=int, default=300, help="training steps in all (default 300)")
    parser.add_argument("--epochs", type=int, default=3, help="the steps spread over this many epochs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--workers", type=int, default=12, help="DataLoader workers (default 12)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--pipeline-batches", type=int, default=20)
    parser.add_argument("--work", help="folder for the tree and the run (default: a new temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    result = run(args)
    print(machine_line(result["machine"]))
    print(f"device {result['device']} ({result['gpu'] or 'no GPU'})")
    for key in (
        "pipeline_images_per_s",
        "train_images_per_s_first_epoch",
        "train_images_per_s_steady",
        "gpu_utilisation_mean",
        "pipeline_keeps_up",
        "evaluate_accuracy_pass_images_per_s",
        "evaluate_seconds",
    ):
        value = result[key]
        print(f"{key:40s} {value:.1f}" if isinstance(value, float) else f"{key:40s} {value}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
