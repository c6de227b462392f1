"""Training compute of B-cosification and alignment against the from-scratch B-cos model (issue 16).

Reproduce (from the repository root, on a quiet machine)::

    .venv/bin/python benchmarks/bcosify_compute.py --json benchmarks/results/bcosify_compute.json

Each row runs the real training path (``bcosvit train`` with a one-stage recipe written for it) for
one short epoch of ``--images`` Fashion-MNIST training images and reads the run's own
``train_images_per_s`` (teacher forward passes included), median of ``--repeats`` rounds with the
rows interleaved. All rows run eagerly (no ``torch.compile``) in the precision "auto" picks, so the
ratios compare like with like. Compute is counted as ``epochs × 60,000 images / (images/s)``:

- from scratch: the shipped ``bcos_vitc_micro_28``'s 66 epochs (``fmnist-bcos_vitc_micro_28``:
  30 plain, 15 with EMA, 15 with the distance penalty, 6 with the energy loss);
- ``fmnist-bcosify``: its warmup epoch (B from 1 to 2, biases shrinking; measured as in the recipe,
  the short measured epoch lies wholly inside the warmup) and the epochs after it (the bias-free
  B = 2 model, measured with ``bcosify_warmup_epochs = 0``);
- ``fmnist-align``: its alignment epochs (student and frozen teacher) and its head epochs;
- the same recipe with a teacher of another shape (``bcosvit align --teacher RUN --student
  bcos_vitc_micro_28``, the teacher a ``vit_mini_patch4_28``: wider, reached through learned
  projections): the teacher here is a randomly initialised one, saved to a temporary file, since
  the time of a step does not depend on the weights.

The budget of the issue is 20 % of the from-scratch compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from throughput import log, machine_info, machine_line, positive_int, run_record, write_results

from bcosvit.app.training import load_recipe
from bcosvit.models import create_model
from bcosvit.weights.checkpoint import save_weights

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "bcosify_compute.json"
TRAIN_IMAGES = 60_000
BUDGET = 0.20
OTHER_TEACHER = "vit_mini_patch4_28"  # the different-shape teacher of docs/results.md
OTHER_STUDENT = "bcos_vitc_micro_28"
METHODS = ("scratch", "bcosify", "align", "align other shape")


@dataclass(frozen=True)
class Row:
    """One measured training configuration and how many epochs of it a method spends."""

    name: str
    recipe: str
    stage: str | None
    epochs: float
    method: str  # one of METHODS
    overrides: tuple[tuple[str, object], ...] = ()  # training options set for the measurement


def rows(other_teacher: Path) -> list[Row]:
    """The measured configurations, with the epochs each recipe spends in them. ``other_teacher``:
    the weights file of the different-shape teacher."""
    scratch = load_recipe("fmnist-bcos_vitc_micro_28")
    listed = [Row(f"scratch {s.name}", scratch.name, s.name, s.config.epochs, "scratch") for s in scratch.stages]
    bcosify = load_recipe("fmnist-bcosify")
    config = bcosify.stages[0].config
    # B = 1 -> 2 with biases during the warmup, then the bias-free B = 2 model (warmup 0 measures it)
    warmup = min(config.bcosify_warmup_epochs, config.epochs)
    listed += [Row("bcosify warmup", bcosify.name, None, warmup, "bcosify")] if warmup else []
    after = (("bcosify_warmup_epochs", 0.0),)
    listed += [Row("bcosify after warmup", bcosify.name, None, config.epochs - warmup, "bcosify", after)]
    align = load_recipe("fmnist-align")
    listed += [Row(f"align {s.name}", align.name, s.name, s.config.epochs, "align") for s in align.stages]
    # `bcosvit align --student`: a fresh student, so no B-cosified teacher; the teacher only in the align stage
    fresh = (("model", OTHER_STUDENT), ("bcosify_from", None))
    listed += [
        Row(
            f"align other shape {s.name}",
            align.name,
            s.name,
            s.config.epochs,
            "align other shape",
            fresh + ((("align_to", str(other_teacher)),) if s.config.align_to else ()),
        )
        for s in align.stages
    ]
    return listed


def toml_value(value: object) -> str:
    """``value`` (a string, number, bool or flat mapping) as TOML."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # JSON strings, numbers and booleans are TOML too


def recipe_file(row: Row, folder: Path, images: int) -> Path:
    """A one-stage recipe file: ``row``'s stage as its recipe sets it, one epoch on ``images`` images."""
    recipe = load_recipe(row.recipe)
    stage = next(s for s in recipe.stages if row.stage is None or s.name == row.stage)
    config = stage.config.to_dict()
    config.update(epochs=1, train_subset=images, test_subset=256, compile=False, explain_examples=False)
    config.pop("init_from", None)  # the timing does not depend on the starting weights
    config.update(row.overrides)
    config = {k: v for k, v in config.items() if v is not None}  # TOML has no None: unset (overrides too)
    lines = [f'description = "{row.name}, timed"', "", "[train]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in config.items()]
    path = folder / f"{row.name.replace(' ', '-')}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(row: Row, folder: Path, images: int) -> float:
    """Training images per second of one short run of ``row``."""
    out = folder / f"run-{row.name.replace(' ', '-')}"
    recipe = recipe_file(row, folder, images)
    command = [sys.executable, "-m", "bcosvit", "train", "--recipe", str(recipe), "--out", str(out), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{row.name}: bcosvit train failed:\n{done.stderr[-2000:]}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["train_images_per_s"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--images", type=positive_int, default=3840, help="training images per measured epoch")
    parser.add_argument("--repeats", type=positive_int, default=3, help="rounds; the median is reported")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write all numbers")
    return parser.parse_args(argv)


def random_teacher(folder: Path) -> Path:
    """A randomly initialised ``OTHER_TEACHER`` saved in ``folder``: its step time is a trained one's."""
    return save_weights(create_model(OTHER_TEACHER), folder / f"{OTHER_TEACHER}.safetensors", {})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log(machine_line(machine_info()))
    measured: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        listed = rows(random_teacher(Path(tmp)))
        for round_ in range(args.repeats):
            for row in listed:
                folder = Path(tmp) / f"round{round_}"
                folder.mkdir(exist_ok=True)
                measured.setdefault(row.name, []).append(measure(row, folder, args.images))
                log(f"round {round_ + 1}: {row.name} {measured[row.name][-1]:.0f} img/s")
    table = []
    for row in listed:
        rate = statistics.median(measured[row.name])
        seconds = row.epochs * TRAIN_IMAGES / rate
        table.append({**row.__dict__, "overrides": dict(row.overrides), "images_per_s": rate, "seconds": seconds})
    totals = {m: sum(r["seconds"] for r in table if r["method"] == m) for m in METHODS}
    print("| configuration | epochs | images/s | compute (s) |")
    print("|---|---|---|---|")
    for r in table:
        print(f"| {r['name']} | {r['epochs']} | {r['images_per_s']:.0f} | {r['seconds']:.0f} |")
    for method in METHODS[1:]:
        share = totals[method] / totals["scratch"]
        print(
            f"{method}: {totals[method]:.0f} s = {100 * share:.1f} % of from scratch ({totals['scratch']:.0f} s); "
            f"budget {100 * BUDGET:.0f} %: {'met' if share <= BUDGET else 'NOT met'}"
        )
    write_results(args.json, {**run_record(args, argv), "machine": machine_info(), "rows": table, "totals": totals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
