"""Save what bcosvit computes through its public interface, and compare two such snapshots.

A restructuring must not change behaviour. Run this before and after it and compare:

    python scripts/behaviour_snapshot.py save /tmp/before     # on the old tree
    python scripts/behaviour_snapshot.py save /tmp/after      # on the new tree
    python scripts/behaviour_snapshot.py compare /tmp/before /tmp/after

It records, with fixed seeds in float32 on one thread (about 3 minutes on two CPU cores):
explanations of the shipped B-cos model (every target form, a baseline, intermediate units,
token contributions), every attribution method on both shipped models, a random-init forward of
every registered model, and through the command line: ``models``, ``explain`` on image files,
``evaluate`` on 300 test images, and one-epoch ``train`` runs (from scratch, B-cosified, aligned)
on the committed Fashion-MNIST subset (their metrics without timings and a hash of every weight).

``compare`` matches arrays by value; an array whose singleton axes differ (a target axis kept
where it used to be squeezed) compares equal when its values are, and the shape change is listed.
Texts compare without timings, and without the paths of the snapshots and of the data folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "fashion-mnist"
TIMING_KEYS = ("epoch_seconds", "train_images_per_s", "seconds", "elapsed", "images_per_s")


def _bcosvit(*args: str, cwd: Path) -> str:
    """Run ``bcosvit ARGS`` in a new interpreter on one thread; its stdout (stderr on failure)."""
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent), "HOME": str(cwd)}
    if "PYTHONPATH" in os.environ:  # a snapshot of another tree than the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    code = "import sys, torch; torch.set_num_threads(1); from bcosvit.app.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"bcosvit {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _weights_digest(path: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    return {k: hashlib.sha256(v.tobytes()).hexdigest()[:16] for k, v in sorted(load_file(str(path)).items())}


def _library(arrays: dict[str, np.ndarray]) -> None:
    import torch

    import bcosvit
    from bcosvit.attribution import METHODS, attribute

    torch.set_num_threads(1)
    bcos = bcosvit.create_model("bcos_vitc_micro_28", pretrained=True)
    twin = bcosvit.create_model("vitc_micro_28", pretrained=True)
    from bcosvit.app.data import batch_to_device, load_fashion_mnist

    test = load_fashion_mnist("test", DATA)
    images = batch_to_device(torch.stack([test[i][0] for i in range(12)]), "cpu")  # uint8 items -> [0, 1]
    labels = torch.tensor([int(test[i][1]) for i in range(12)])
    arrays["images"] = images.numpy()

    def record(prefix: str, expl) -> None:
        for field in ("logits", "target", "outputs", "weights", "contributions", "positional", "at_baseline"):
            arrays[f"{prefix}.{field}"] = getattr(expl, field).detach().numpy()
        arrays[f"{prefix}.completeness_error_small"] = (expl.completeness_error < 1e-3).numpy()

    record("explain.none", bcosvit.explain(bcos, images))
    record("explain.int", bcosvit.explain(bcos, images, target=3))
    record("explain.list", bcosvit.explain(bcos, images, target=labels.tolist()))
    top2 = bcos(images).topk(2, dim=1).indices
    record("explain.top2", bcosvit.explain(bcos, images, target=top2))
    record("explain.baseline", bcosvit.explain(bcos, images, target=labels, baseline=0.5))
    record("unit.max", bcosvit.explain_unit(bcos, images, layer=2, token=5, channel="max"))
    record("unit.norm", bcosvit.explain_unit(bcos, images, layer=-1, token=3, channel="norm"))
    record("unit.pair", bcosvit.explain_unit(bcos, images, layer=1, token=7, channel=[[1, 2]] * 12))
    arrays["tokens.last"] = bcosvit.token_contributions(bcos, images, labels).detach().numpy()
    arrays["tokens.several"] = bcosvit.token_contributions(bcos, images, top2, layer=[0, 2, 5]).detach().numpy()
    for method in METHODS:
        for name, model in (("bcos", bcos), ("twin", twin)):
            if method == "bcos" and not model.is_bcos:
                continue
            arrays[f"attribute.{method}.{name}"] = attribute(method, model, images[:6], labels[:6]).detach().numpy()
    for name in bcosvit.list_models():
        if "large" in name or "base" in name:
            continue  # the largest configurations are counted by `bcosvit models`
        torch.manual_seed(0)
        model = bcosvit.create_model(name).eval()
        x = torch.rand(2, model.in_chans, model.image_size, model.image_size)
        with torch.no_grad():
            arrays[f"forward.{name}"] = model(x).numpy()


def _command_line(out: Path, texts: dict[str, object]) -> None:
    work = out / "work"
    work.mkdir(parents=True)
    texts["models"] = _bcosvit("models", cwd=work)
    from PIL import Image

    from bcosvit.app.data import load_fashion_mnist

    test = load_fashion_mnist("test", DATA)
    files = []
    for i in range(3):
        path = work / f"item{i}.png"
        Image.fromarray(test[i][0][0].numpy()).save(path)  # the item's uint8 pixels as they are
        files.append(str(path))
    texts["explain"] = _bcosvit("explain", *files, "--out", "figures", cwd=work)
    texts["explain.target"] = _bcosvit("explain", files[0], "--target", "3", "--out", "figures-t", cwd=work)
    texts["evaluate"] = _bcosvit(
        "evaluate", "--data-dir", str(DATA), "--test-subset", "300", "--grids", "4", "--faithfulness-images", "12",
        "--ig-steps", "4", "--out", "evaluation", cwd=work,
    )  # fmt: skip
    texts["evaluate.metrics"] = _without_timings(json.loads((work / "evaluation" / "metrics.json").read_text()))
    common = ["--data-dir", str(DATA), "--epochs", "1", "--batch-size", "64", "--no-progress"]
    small = ["--set", "train_subset=256", "--set", "test_subset=128", "--set", "precision=fp32"]
    runs = {
        "train": ["train", "--model", "bcos_vit_nano_patch4_28", *common, *small, "--set", "warmup_steps=2"],
        "bcosify": ["train", "--bcosify-from", "vitc_micro_28", *common, *small, "--set", "bcosify_warmup_epochs=0.5"],
        "align": ["align", "--teacher", "vitc_micro_28", *common, *small, "--set", "align.epochs=1",
                  "--set", "head.epochs=1"],
    }  # fmt: skip
    for name, args in runs.items():
        log = _bcosvit(*args, "--out", name, cwd=work).splitlines()
        texts[f"{name}.log"] = [line for line in log if "s (" not in line]  # without the timed lines
        for model_json in sorted((work / name).rglob("model.json")):
            run = model_json.parent
            key = f"{name}/{run.relative_to(work / name)}"
            texts[f"{key}.metrics"] = [
                _without_timings(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()
            ]
            texts[f"{key}.weights"] = _weights_digest(run / "model.safetensors")
            meta = json.loads(model_json.read_text())
            texts[f"{key}.model.json"] = {k: v for k, v in meta.items() if k not in ("weights_id",)}


def save(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    arrays: dict[str, np.ndarray] = {}
    _library(arrays)
    np.savez(out / "arrays.npz", **arrays)
    texts: dict[str, object] = {}
    _command_line(out, texts)
    (out / "texts.json").write_text(json.dumps(texts, indent=1, sort_keys=True, default=str))
    print(f"saved {len(arrays)} arrays and {len(texts)} texts to {out}")


def _comparable(value, a: Path, b: Path):
    """``value`` without what differs from run to run: each snapshot's folder and the tree's data
    folder replaced by placeholders, timings (fields and "12s" in log lines) dropped."""
    text = json.dumps(_without_timings(value), sort_keys=True)
    text = text.replace(str(a), "<snapshot>").replace(str(b), "<snapshot>")
    text = re.sub(r'[^"\s]*/tests/data/fashion-mnist', "<data>", text)
    return json.loads(re.sub(r"\b\d+s\b", "<time>", text))


def compare(a: Path, b: Path) -> int:
    before, after = np.load(a / "arrays.npz"), np.load(b / "arrays.npz")
    problems, reshaped = [], []
    for key in sorted(set(before.files) | set(after.files)):
        if key not in before.files or key not in after.files:
            problems.append(f"{key}: only in {'after' if key in after.files else 'before'}")
            continue
        x, y = before[key], after[key]
        if x.shape != y.shape:
            if np.squeeze(x).shape != np.squeeze(y).shape:
                problems.append(f"{key}: shape {x.shape} -> {y.shape}")
                continue
            reshaped.append(f"{key}: {x.shape} -> {y.shape}")
            x, y = np.squeeze(x), np.squeeze(y)
        if not np.array_equal(x, y):
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64)).max()
            problems.append(f"{key}: values differ (max abs difference {diff:.3g})")
    texts_a = _comparable(json.loads((a / "texts.json").read_text()), a, b)
    texts_b = _comparable(json.loads((b / "texts.json").read_text()), a, b)
    for key in sorted(set(texts_a) | set(texts_b)):
        if texts_a.get(key) != texts_b.get(key):
            old, new = str(texts_a.get(key))[:600], str(texts_b.get(key))[:600]
            problems.append(f"{key}: differs\n  before: {old}\n  after:  {new}")
    print(f"{len(before.files)} arrays and {len(texts_a)} texts compared")
    for line in reshaped:
        print(f"same values, new shape: {line}")
    for line in problems:
        print(f"DIFFERENT: {line}")
    print("identical" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        save(Path(sys.argv[2]).absolute())
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]).absolute(), Path(sys.argv[3]).absolute()))
    else:
        sys.exit(__doc__)
