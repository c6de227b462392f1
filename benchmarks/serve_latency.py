"""Server-side latency of ``bcosvit serve``: from a click to the updated explanation.

    .venv/bin/python benchmarks/serve_latency.py --json benchmarks/results/serve_latency.json

Times the callbacks the page runs (``bcosvit.app.serve.ui.Page``), called as Gradio calls them, plus
the PNG encoding of every picture they return (what Gradio does before it sends them), on the same
image each time; the median of ``--repeats`` (20) calls after ``--warmup`` untimed ones. Measured:

* class switch: ``Page.select_class`` alternating between the top two classes (class explanation,
  its three pictures, the block-by-block strip);
* token click: ``Page.click_token`` alternating between two tokens (``W_{1->l}(x)`` of the token's
  largest channel at the last block, its pictures, the framed input);
* layer change: ``Page.select_unit`` alternating between the first and the last layer.

Also reported, not targeted: opening an image (upload) and the side-by-side step (post-hoc maps of
the standard twin; shipped pair only). Models: the shipped ``bcos_vitc_micro_28`` (with its twin
``vitc_micro_28``) on a Fashion-MNIST example, and ``bcos_vit_tiny_patch16_224`` with random weights
(no ImageNet weights are downloaded here; the time does not depend on the weights' values) on the
same example enlarged to a 256x256 RGB file (resized and centre-cropped to 224 as for ImageNet).

Targets: at most 300 ms for the 28x28 model and 2 s for ``bcos_vit_tiny_patch16_224`` on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import bcosvit
from bcosvit.fileio import atomic_write

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "serve_latency.json"
TARGETS_S = {"bcos_vitc_micro_28": 0.3, "bcos_vit_tiny_patch16_224": 2.0}
TIMED = ("class switch", "token click", "layer change")


def encode_pictures(outputs: Any) -> int:
    """PNG-encode every picture in a callback's outputs (as Gradio does before sending them); returns the count."""
    count = 0
    for value in outputs if isinstance(outputs, tuple | list) else [outputs]:
        if isinstance(value, np.ndarray) and value.ndim == 3:
            Image.fromarray(np.round(value.clip(0, 1) * 255).astype(np.uint8)).save(io.BytesIO(), format="png")
            count += 1
        elif isinstance(value, tuple | list):
            count += encode_pictures(value)
    return count


def median_time(step: Callable[[int], Any], repeats: int, warmup: int) -> tuple[float, list[float]]:
    """Median seconds of ``step(i)`` with its pictures encoded, over ``repeats`` calls after ``warmup``."""
    for i in range(warmup):
        encode_pictures(step(i))
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        encode_pictures(step(i))
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(label: str, models: dict, image: Path, repeats: int, warmup: int) -> dict[str, Any]:
    import gradio as gr

    from bcosvit.app.serve.session import Explorer, Session
    from bcosvit.app.serve.ui import Page

    page = Page(Explorer(models), Path(tempfile.mkdtemp()))
    model = models[label]
    depth = model.config.depth
    layer, unit, channel = depth, "largest channel", 0
    start = time.perf_counter()
    outputs = page.open(str(image), label, layer, unit, channel, Session())
    open_s = time.perf_counter() - start
    session = outputs[-1]
    if session.class_view is None:
        raise RuntimeError(f"opening {image} failed: {outputs[0]}")
    top2 = [s.index for s in session.scores[:2]]
    from bcosvit.app.serve import views

    size = views.enlarge(np.zeros((model.image_size, model.image_size, 1))).shape[0]  # the page's input picture
    clicks = [gr.SelectData(None, {"index": [size * 0.1, size * 0.9], "value": None}),
              gr.SelectData(None, {"index": [size * 0.6, size * 0.3], "value": None})]  # fmt: skip
    steps = {
        "class switch": lambda i: page.select_class(top2[(i + 1) % 2], session),
        "token click": lambda i: page.click_token(layer, unit, channel, session, clicks[i % 2]),
        "layer change": lambda i: page.select_unit((0, depth)[i % 2], unit, channel, session),
    }
    result: dict[str, Any] = {"model": label, "image": image.name, "open_s": open_s, "steps": {}}
    for name, step in steps.items():
        median, times = median_time(step, repeats, warmup)
        result["steps"][name] = {"median_s": median, "times_s": times}
    twin = page.explorer.default_comparison(label)
    if twin is not None:
        median, times = median_time(lambda i: page.compare(twin, session), max(3, repeats // 4), 1)
        result["steps"]["side by side (not targeted)"] = {"median_s": median, "times_s": times}
    worst = max(result["steps"][name]["median_s"] for name in TIMED)
    result["target_s"] = TARGETS_S.get(label)
    result["meets_target"] = None if result["target_s"] is None else worst <= result["target_s"]
    return result


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "niceness": os.nice(0),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own, the core count)")
    parser.add_argument("--skip-tiny", action="store_true", help="only the shipped 28x28 model")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bcosvit.app.serve import views

    coat = next(p for p in views.example_images() if "Coat" in p.name)
    folder = Path(tempfile.mkdtemp())
    photo = folder / "coat-256-rgb.png"
    Image.open(coat).convert("RGB").resize((256, 256), Image.BILINEAR).save(photo)
    shipped = {name: bcosvit.create_model(name, pretrained=True) for name in ("bcos_vitc_micro_28", "vitc_micro_28")}
    runs = [measure("bcos_vitc_micro_28", shipped, coat, args.repeats, args.warmup)]
    if not args.skip_tiny:
        torch.manual_seed(0)
        tiny = {"bcos_vit_tiny_patch16_224": bcosvit.create_model("bcos_vit_tiny_patch16_224").eval()}
        runs.append(measure("bcos_vit_tiny_patch16_224", tiny, photo, args.repeats, args.warmup))
    info = machine_info()
    print(
        f"machine: {info['cpu_count']} cores, torch.get_num_threads() = {info['torch_num_threads']}, "
        f"torch {info['torch_version']}, load average {info['load_average_1_5_15min'][0]:.2f}, nice {info['niceness']}"
    )
    print(f"{'model':28s} {'step':30s} {'median ms':>10s} {'target ms':>10s}")
    for run in runs:
        print(f"{run['model']:28s} {'open an image (not targeted)':30s} {run['open_s'] * 1000:10.0f}")
        for name, step in run["steps"].items():
            target = f"{run['target_s'] * 1000:.0f}" if name in TIMED and run["target_s"] else ""
            print(f"{run['model']:28s} {name:30s} {step['median_s'] * 1000:10.0f} {target:>10s}")
    command = " ".join([sys.executable, *sys.argv])
    data = {"command": command, "machine": info, "repeats": args.repeats, "warmup": args.warmup, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
