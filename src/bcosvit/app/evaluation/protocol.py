"""The evaluation protocol of ``bcosvit evaluate``: what is measured (``EvalConfig``), which models
fit a dataset (``dataset_mismatch``), the measurements of each model and attribution method
(``evaluate_model``, ``measure_models``) and their typed results (``ModelResult``, ``MethodResult``).

Protocols (all seeded):
- accuracy: top-1 / top-5 on the whole test set, streamed (``stream.predict_test_set``: one pass
  per model keeps per image only its predicted class and its label's confidence);
- localisation: the grid pointing game (docs/design.md: grid pointing game) on 2×2 and 3×3 grids of
  test images, drawn from those predictions (``samples.load_grid_cells``);
- faithfulness: deletion and insertion curves (``bcosvit.metrics.deletion_insertion``) on
  ``faithfulness_images`` test images drawn stratified by class with the seed
  (``samples.faithfulness_indices``; all of them when the test set is no larger), explaining the
  predicted class, for each replacement value in
  ``baselines``: ``"zero"`` (black; the Fashion-MNIST background, and the reference point of
  integrated gradients) and ``"mean"`` (the per-channel mean of the test images). Both are reported
  because a pixel already at the replacement value cannot be removed: with zero, the evidence a
  model draws from *dark* pixels (a B-cos model sees them through the ``1 - x`` channel) is never
  deleted, and methods that give dark pixels no attribution are favoured. Methods with a
  reference image (integrated gradients, and the exact B-cos explanation, whose contributions
  ``w(x)·[x, 1 - x]`` are relative to the encoded input 0) are measured a second time with the
  reference at each replacement value ``b`` (``relative`` in the results): integrated gradients
  from the all-``b`` image, and ``w(x)·([x, 1 - x] - [b, 1 - b])``, the explanation's own account of
  what the replacement removes;
- completeness: distribution of ``|logit - w·x - positional - bias|`` for B-cos models, on the
  faithfulness images.

Precision: only the accuracy pass runs in ``EvalConfig.precision`` (``"auto"``: bf16 autocast where
bf16 is native, ``bcosvit.app.precision``); it is the pass over every image, and bf16 moves a
prediction only where two logits are within its rounding. Every other pass stays float32: the
completeness error measures float rounding itself (about 1e-6 logit units in float32; bf16's 8-bit
mantissa would put it near 1e-2 and hide a real defect of the explanation), the deletion and
insertion curves compare the probabilities of images a few pixels apart (differences of the size
of bf16's 0.4 % rounding), and the maps of every method are then computed as the published
protocols compute them, comparable across machines.

Several processes (``torchrun``, ``runtime.EvalRuntime``): each measures a shard of the test set,
of the grid cells and of the faithfulness images, cut at multiples of ``batch_size`` so that the
batches are those of one process; the parts are gathered on every process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...attribution import METHODS, attribute
from ...errors import ConfigError, DataError
from ...explanation import explain
from ...metrics import (
    AttributionMethod,
    CompletenessStats,
    CurveResult,
    GridResult,
    TopkAccuracy,
    completeness_stats,
    compute_attributions,
    concat_curves,
    confident_indices_by_class,
    deletion_insertion,
    sample_grids,
    score_grid_cells,
)
from ...models.vit import VisionTransformer
from ...validation import check_fields, is_int, is_number
from ..data import DataSpec
from .runtime import EvalRuntime, check_device, check_precision, start_runtime
from .samples import FaithfulnessImages, GridCells, load_faithfulness, load_grid_cells, too_few_classes
from .stream import PixelSums, labels_of, predict_test_set, tensor_test_set

POST_HOC = tuple(m for m in METHODS if m != "bcos")
# Methods with a reference image (their ``baseline`` option), and its default: their curves are
# measured a second time with the reference at each replacement value ("relative to the baseline").
REFERENCE_METHODS: dict[str, float | None] = {"integrated_gradients": 0.0, "bcos": None}


@dataclass
class EvalConfig:
    """What ``evaluate_models`` measures and how much of it."""

    grids: tuple[int, ...] = (2, 3)
    num_grids: int = 30
    faithfulness_images: int = 256
    steps: int = 20
    ig_steps: int = 10
    methods: tuple[str, ...] = METHODS
    # Images per pass through a model (attributions, curves, accuracy); integrated gradients run one
    # quadrature step of this many images per pass. On two CPU cores, integrated gradients on the
    # 3x3 canvases take 0.80x (B-cos) and 0.96x (twin) the time at 64 (benchmarks/eval_batch_size.py).
    batch_size: int = 32
    seed: int = 0
    baselines: tuple[str, ...] = ("zero", "mean")  # deletion/insertion replacement values (or numbers)
    test_subset: int | None = None  # the command draws N test images stratified by class (None: all of them)
    device: str = "auto"  # "auto" (CUDA when there is a device), "cpu" or "cuda"
    precision: str = "auto"  # of the accuracy pass: "auto" (bf16 where native), "fp32" or "bf16"
    workers: int | None = None  # DataLoader workers per process (None: by the cores, 0 for images in memory)

    def validate(self, num_classes: int | None = None) -> None:
        """Raise ``ConfigError`` naming the first invalid value; with ``num_classes`` (the models'), also
        for grids with more cells than there are classes (each cell shows a different class)."""
        self._check_types()
        for name in self.baselines:
            if name not in ("zero", "mean"):
                try:
                    number = float(name)
                except ValueError:
                    raise ConfigError(f"deletion baseline must be 'zero', 'mean' or a number, got {name!r}") from None
                if not is_number(number):
                    raise ConfigError(f"deletion baseline must be a finite number, got {name!r}")
        if not self.baselines:
            raise ConfigError("give at least one deletion baseline ('zero', 'mean' or a number)")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
        if any(g < 2 for g in self.grids):
            raise ConfigError(f"grid sizes must be >= 2, got {list(self.grids)}")
        for name in ("num_grids", "faithfulness_images", "steps", "ig_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_with_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.test_subset is not None and self.test_subset < 1:
            raise ConfigError(
                f"{_with_flag('test_subset')} must be >= 1 (or unset for the whole test set), got {self.test_subset}"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"{_with_flag('seed')} must lie in [0, 2**32), got {self.seed}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(
                f"{_with_flag('workers')} must be >= 0 (0: read images in the main process), got {self.workers}"
            )
        check_device(self.device)
        check_precision(self.precision)
        if num_classes is not None and max(self.grids, default=0) ** 2 > num_classes:
            g = max(self.grids)
            raise ConfigError(
                f"a {g}x{g} grid (--grid-sizes) needs {g * g} distinct classes but the models have {num_classes}; "
                f"use grid sizes up to {math.isqrt(num_classes)}"
            )

    def _check_types(self) -> None:
        """Raise ``ConfigError`` naming the first field whose value has the wrong type (whole numbers, and
        sequences of whole numbers or of strings); ``validate`` checks the ranges."""
        check_fields(
            {_with_flag(name): getattr(self, name) for name in _INTEGERS},
            {_with_flag(name): (int, type(None)) if name in _OPTIONAL else int for name in _INTEGERS},
            "the evaluation settings",
        )
        for name in ("device", "precision"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{_with_flag(name)} must be a name, got {getattr(self, name)!r:.60}")
        for name, is_item, what in (
            ("grids", is_int, "whole numbers"),
            ("methods", _is_text, "names"),
            ("baselines", _is_text, "strings ('zero', 'mean' or numbers)"),
        ):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(map(is_item, value)):
                raise ConfigError(f"{_with_flag(name)} must be a sequence of {what}, got {value!r:.60}")


# The whole-number fields of EvalConfig (those in ``_OPTIONAL`` may also be None).
_INTEGERS = ("num_grids", "faithfulness_images", "steps", "ig_steps", "batch_size", "seed", "test_subset", "workers")
_OPTIONAL = ("test_subset", "workers")


def _is_text(value: object) -> bool:
    return isinstance(value, str)


# The ``bcosvit evaluate`` flag of each EvalConfig field that has one (named in error messages).
_FLAGS = {
    "grids": "--grid-sizes",
    "num_grids": "--grids",
    "faithfulness_images": "--faithfulness-images",
    "ig_steps": "--ig-steps",
    "test_subset": "--test-subset",
    "seed": "--seed",
    "methods": "--methods",
    "baselines": "--baselines",
    "batch_size": "--batch-size",
    "device": "--device",
    "precision": "--precision",
    "workers": "--workers",
}


def _with_flag(name: str) -> str:
    """``"num_grids (--grids)"``: a field's name and its command-line flag, if it has one."""
    return f"{name} ({_FLAGS[name]})" if name in _FLAGS else name


def dataset_mismatch(model: VisionTransformer, spec: DataSpec) -> str | None:
    """Why ``model`` cannot be evaluated on the dataset described by ``spec`` (None when it can):
    a different number of classes, other class names (when the model stores them), channels or size."""
    if model.num_classes != spec.num_classes:
        return f"has {model.num_classes} classes but the dataset has {spec.num_classes}"
    names = model.config.class_names
    if names and list(names) != list(spec.classes):
        return f"was trained on other classes than the dataset's: {class_differences(names, spec.classes)}"
    if model.in_chans != spec.in_chans:
        return f"takes {model.in_chans}-channel images but the dataset's have {spec.in_chans}"
    if model.image_size != spec.image_size:
        return f"takes {model.image_size}x{model.image_size} images but the dataset is read at {spec.image_size}"
    return None


def class_differences(model_classes: Sequence[str], dataset_classes: Sequence[str], shown: int = 3) -> str:
    """A short account of how two class lists differ: their counts and the first ``shown``
    positions where they disagree (not the lists: ImageNet's hold 1000 names)."""
    differing = [k for k, (a, b) in enumerate(zip(model_classes, dataset_classes)) if a != b]
    text = f"{len(model_classes)} model classes, {len(dataset_classes)} dataset classes"
    if differing:
        first = "; ".join(f"class {k}: {model_classes[k]!r} vs {dataset_classes[k]!r}" for k in differing[:shown])
        more = f" and {len(differing) - shown} more" if len(differing) > shown else ""
        text += f", {len(differing)} differ ({first}{more})"
    return text


# Deletion and insertion curves of one method: mode ("deletion", "insertion") -> replacement value -> curves.
Curves = dict[str, dict[str, CurveResult]]


def _curves_dict(curves: Curves) -> dict[str, dict[str, Any]]:
    return {mode: {base: curve.to_dict() for base, curve in by_base.items()} for mode, by_base in curves.items()}


@dataclass
class MethodResult:
    """One attribution method's measurements on one model.

    Attributes:
        grids: grid size -> its pointing game.
        curves: the deletion and insertion curves of the method's maps.
        relative: for methods with a reference image (``REFERENCE_METHODS``), the curves with the
            reference at each replacement value; None for the others.
        seconds: how long the measurements took.
    """

    grids: dict[int, GridResult]
    curves: Curves
    relative: Curves | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``grid<size>`` (without per-cell scores), ``deletion``, ``insertion``, ``relative``
        (when measured) and ``seconds``."""
        out: dict[str, Any] = {f"grid{grid}": game.to_dict(include_scores=False) for grid, game in self.grids.items()}
        out.update(_curves_dict(self.curves))
        if self.relative is not None:
            out["relative"] = _curves_dict(self.relative)
        out["seconds"] = self.seconds
        return out


@dataclass
class ModelResult:
    """Every measurement of one model."""

    name: str
    is_bcos: bool
    accuracy: TopkAccuracy
    source: str = ""  # where the model came from: a checkpoint path or a shipped model's name
    methods: dict[str, MethodResult] = field(default_factory=dict)
    completeness: CompletenessStats | None = None
    seconds: float = 0.0
    pass_images_per_s: float = 0.0  # test images per second of the accuracy pass (all processes together)
    # grid size -> why the pointing game has no grids of that size (too few classes with confident images)
    grids_skipped: dict[int, str] = field(default_factory=dict)
    # the classes and test-set indices (4,) of the first 2x2 grid (sample_grids with the seed), which
    # the figure grid_examples.png shows; not written to JSON
    figure_grid: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as ``metrics.json`` stores it under ``models`` (``grids_skipped`` only when a
        grid size was skipped)."""
        out = {
            "name": self.name,
            "is_bcos": self.is_bcos,
            "accuracy": self.accuracy.to_dict(),
            "source": self.source,
            "methods": {method: result.to_dict() for method, result in self.methods.items()},
            "completeness": self.completeness.to_dict() if self.completeness is not None else None,
            "seconds": self.seconds,
            "accuracy_pass_images_per_s": self.pass_images_per_s,
        }
        if self.grids_skipped:
            out["grids_skipped"] = {f"grid{grid}": reason for grid, reason in self.grids_skipped.items()}
        return out


def curve_rows(res: ModelResult) -> Iterator[tuple[str, str, Curves]]:
    """``(method, label, curves)`` for every method's curves, then its curves relative to the baseline."""
    for method, entry in res.methods.items():
        yield method, method, entry.curves
        if entry.relative is not None:
            yield method, f"{method} relative to the baseline", entry.relative


def baseline_value(name: str, images: Tensor | PixelSums) -> float | Tensor:
    """The replacement value named ``name``: 0, the per-channel mean ``(C, 1, 1)`` of ``images``
    ``(N, C, H, W)`` (or of the images whose pixels ``PixelSums`` added up), or a number."""
    if name == "zero":
        return 0.0
    if name == "mean":
        return (images if isinstance(images, PixelSums) else PixelSums.of(images)).mean()
    return float(name)


def method_fn(name: str, config: EvalConfig, **options: Any) -> AttributionMethod:
    """``(model, images, target) -> (N, H, W)`` for the named attribution method (``options``: its keywords)."""
    if name == "integrated_gradients":
        options = {"n_steps": config.ig_steps, "internal_batch_size": config.batch_size, **options}
    return partial(_attribute, name, options)


def _attribute(name: str, options: dict, model: VisionTransformer, images: Tensor, target: Tensor) -> Tensor:
    return attribute(name, model, images, target, **options)


def _curves(
    model: VisionTransformer,
    images: Tensor,
    target: Tensor,
    maps: dict[str, Tensor],
    baselines: dict[str, float | Tensor],
    config: EvalConfig,
) -> Curves:
    """``{"deletion": {baseline: curve}, "insertion": {...}}`` of ``maps[baseline]`` for each baseline in ``maps``."""
    return {
        mode: {
            base: deletion_insertion(
                model,
                images,
                target,
                base_maps,
                steps=config.steps,
                baseline=baselines[base],
                mode=mode,
                batch_size=config.batch_size,
            )
            for base, base_maps in maps.items()
        }
        for mode in ("deletion", "insertion")
    }


def _relative_curves(
    method: str,
    curves: Curves,
    model: VisionTransformer,
    images: Tensor,
    target: Tensor,
    baselines: dict[str, float | Tensor],
    config: EvalConfig,
) -> Curves:
    """Curves of ``method`` recomputed with its reference at each replacement value.

    Where the replacement value is the method's own reference (black, for integrated gradients)
    its ``curves`` are reused.
    """
    own = REFERENCE_METHODS[method]
    maps = {
        base: compute_attributions(model, images, target, method_fn(method, config, baseline=value), config.batch_size)
        for base, value in baselines.items()
        if not (own is not None and isinstance(value, float) and value == own)
    }
    relative = _curves(model, images, target, maps, baselines, config)
    return {mode: {b: relative[mode].get(b, curves[mode][b]) for b in config.baselines} for mode in relative}


def _grid_scores(
    model: VisionTransformer, cells: GridCells, grid: int, fn: AttributionMethod, batch_size: int
) -> Tensor:
    """``(len(pairs),)`` float64: the scores of this process's (grid, cell) pairs of one grid size."""
    drawn = cells.grids[grid]
    if not drawn.pairs:
        return torch.zeros(0, dtype=torch.float64)
    return score_grid_cells(
        model, cells.images, drawn.classes, drawn.local_indices, fn, grid, pairs=drawn.pairs, batch_size=batch_size
    )


# One process's share of a method's measurements: the cell scores of each grid size, and its curves
# and relative curves (None where it has no faithfulness images, or for methods without a reference).
_MethodPart = tuple[dict[int, Tensor], Curves | None, Curves | None]


def _method_part(
    method: str,
    model: VisionTransformer,
    cells: GridCells,
    faithfulness: FaithfulnessImages,
    baselines: dict[str, float | Tensor],
    config: EvalConfig,
) -> _MethodPart:
    fn = method_fn(method, config)
    scores = {grid: _grid_scores(model, cells, grid, fn, config.batch_size) for grid in cells.grids}
    images, predicted = faithfulness.images, faithfulness.predicted
    if not faithfulness.share:
        return scores, None, None
    maps = compute_attributions(model, images, predicted, fn, config.batch_size)
    curves = _curves(model, images, predicted, dict.fromkeys(config.baselines, maps), baselines, config)
    relative = None
    if method in REFERENCE_METHODS:
        relative = _relative_curves(method, curves, model, images, predicted, baselines, config)
    return scores, curves, relative


def _joined_curves(parts: list[Curves | None]) -> Curves | None:
    """The curves of the processes' shares of the faithfulness images as one (None: no parts)."""
    present = [part for part in parts if part is not None]
    if not present:
        return None
    return {
        mode: {base: concat_curves([part[mode][base] for part in present]) for base in by_base}
        for mode, by_base in present[0].items()
    }


def evaluate_method(
    method: str,
    model: VisionTransformer,
    cells: GridCells,
    faithfulness: FaithfulnessImages,
    baselines: dict[str, float | Tensor],
    config: EvalConfig,
    runtime: EvalRuntime | None = None,
) -> MethodResult:
    """One method's measurements on one model: the pointing game on the drawn grids ``cells``
    (``samples.load_grid_cells``), and the deletion and insertion curves of its maps of the predicted
    classes of the ``faithfulness`` images (``samples.load_faithfulness``) for each of the
    ``baselines`` (name -> replacement value), relative to each of them too for methods with a
    reference image. With several processes (``runtime``), each measures its share and the
    result, gathered, is the same on every process."""
    runtime = runtime or EvalRuntime()
    t0 = time.perf_counter()
    parts = runtime.gather(_method_part(method, model, cells, faithfulness, baselines, config))
    games = {}
    for grid, drawn in cells.grids.items():
        scores = torch.cat([part[0][grid] for part in parts]).reshape(drawn.classes.shape)
        games[grid] = GridResult.of(scores, drawn.classes, drawn.image_indices, grid)
    curves = _joined_curves([part[1] for part in parts])
    relative = _joined_curves([part[2] for part in parts])
    if curves is None:
        raise DataError("no faithfulness images were measured; the test set holds no images")
    return MethodResult(games, curves, relative, seconds=time.perf_counter() - t0)


def _completeness_part(
    model: VisionTransformer, faithfulness: FaithfulnessImages, batch_size: int
) -> tuple[Tensor, Tensor] | None:
    """``(errors, outputs)`` ``(n, 1)`` float64 on the CPU of the exact explanations of this process's
    faithfulness images (their predicted classes), in batches: an explanation holds the weights of
    every layer for each image."""
    if not faithfulness.share:
        return None
    errors, outputs = [], []
    for start in range(0, len(faithfulness.share), batch_size):
        part = slice(start, start + batch_size)
        expl = explain(model, faithfulness.images[part], target=faithfulness.predicted[part])
        errors.append(expl.completeness_error.detach().double().cpu())
        outputs.append(expl.outputs.detach().double().cpu())
    return torch.cat(errors), torch.cat(outputs)


def measure_completeness(
    model: VisionTransformer, faithfulness: FaithfulnessImages, config: EvalConfig, runtime: EvalRuntime | None = None
) -> CompletenessStats:
    """The completeness errors of a B-cos model's exact explanations of the faithfulness images,
    gathered from every process and summarised (``completeness_stats``)."""
    runtime = runtime or EvalRuntime()
    parts = [
        part for part in runtime.gather(_completeness_part(model, faithfulness, config.batch_size)) if part is not None
    ]
    return completeness_stats(torch.cat([e for e, _ in parts]), torch.cat([o for _, o in parts]))


def measure_model(
    name: str,
    model: VisionTransformer,
    data: Dataset,
    config: EvalConfig,
    runtime: EvalRuntime | None = None,
    log: Callable[[str], None] = print,
    source: str = "",
) -> ModelResult:
    """Every measurement for one model on the test set ``data`` (items ``(image, label)``, images
    uint8 or float in [0, 1], read item by item, never all held); post-hoc methods for any model,
    ``bcos`` for B-cos models. ``model`` goes to ``runtime.device``; each measurement runs it in
    eval mode and restores its state (``attribution_state``).

    Memory: per image of ``data`` a few scalars (label, prediction, confidence: 32 bytes); beyond
    them the images of the grid cells and of the faithfulness images (their numbers fixed by
    ``config``) and one batch at a time.
    """
    runtime = runtime or EvalRuntime()
    started = time.perf_counter()
    model.to(runtime.device)
    labels = labels_of(data)
    predictions = predict_test_set(model, data, runtime, config.batch_size)
    result = ModelResult(name, model.is_bcos, predictions.accuracy, source)
    result.pass_images_per_s = len(data) / (time.perf_counter() - started)
    log(
        f"{name}: top-1 {result.accuracy.top1:.2f}%, top-5 {result.accuracy.top5:.2f}% "
        f"({result.pass_images_per_s:.0f} images/s)"
    )
    confident, _ = confident_indices_by_class(predictions.predicted, predictions.confidence, labels, model.num_classes)
    if too_few_classes(confident, 2) is None:
        result.figure_grid = tuple(cells[0] for cells in sample_grids(confident, 2, 1, config.seed))
    cells = load_grid_cells(data, confident, config.grids, config.num_grids, config.seed, runtime, config.batch_size)
    result.grids_skipped = cells.skipped
    for grid, reason in cells.skipped.items():
        log(f"  no {grid}x{grid} pointing game: {reason}")
    faithfulness = load_faithfulness(
        data, labels, predictions.predicted, config.faithfulness_images, config.seed, runtime, config.batch_size
    )
    baselines = {name: baseline_value(name, predictions.pixels) for name in config.baselines}
    for method in (m for m in config.methods if m != "bcos" or model.is_bcos):
        result.methods[method] = evaluate_method(method, model, cells, faithfulness, baselines, config, runtime)
        _log_method(method, result.methods[method], config, log)
    if model.is_bcos:
        result.completeness = measure_completeness(model, faithfulness, config, runtime)
        log(
            f"  completeness error: max {result.completeness.absolute.max:.2e}, "
            f"median {result.completeness.absolute.median:.2e} (logit units)"
        )
    result.seconds = time.perf_counter() - started
    return result


def evaluate_model(
    name: str,
    model: VisionTransformer,
    images: Tensor,
    labels: Tensor,
    config: EvalConfig,
    log: Callable[[str], None] = print,
    source: str = "",
) -> ModelResult:
    """``measure_model`` on images ``(N, C, H, W)`` in [0, 1] and labels ``(N,)`` held in memory, on
    ``config.device`` in ``config.precision`` (``runtime.start_runtime``)."""
    data = tensor_test_set(images, labels)
    runtime = start_runtime(config.device, config.precision, config.workers, data)
    return measure_model(name, model, data, config, runtime, log, source)


def measure_models(
    models: dict[str, VisionTransformer],
    data: Dataset,
    config: EvalConfig,
    runtime: EvalRuntime | None = None,
    log: Callable[[str], None] = print,
    sources: dict[str, str] | None = None,
) -> list[ModelResult]:
    """``measure_model`` for every model on the test set ``data``, in order; ``sources``: where each
    came from (by its key)."""
    sources = sources or {}
    return [
        measure_model(name, model, data, config, runtime, log, source=sources.get(name, ""))
        for name, model in models.items()
    ]


def _log_method(method: str, entry: MethodResult, config: EvalConfig, log: Callable[[str], None]) -> None:
    """A method's log lines: its pointing game scores ("-" for a skipped grid size) and curve areas."""
    scores = ", ".join(f"{g}x{g} {entry.grids[g].mean:.3f}" if g in entry.grids else f"{g}x{g} -" for g in config.grids)
    log(f"  {method:24s} pointing game {scores} | {_aucs(entry.curves, config)} | {entry.seconds:.0f}s")
    if entry.relative is not None:
        log(f"  {'  relative to the baseline':24s} {_aucs(entry.relative, config)}")


def _aucs(curves: Curves, config: EvalConfig) -> str:
    """``deletion AUC a/b | insertion AUC c/d (zero/mean)`` for a log line."""
    aucs = " | ".join(
        f"{mode} AUC " + "/".join(f"{curves[mode][b].mean_auc:.3f}" for b in config.baselines)
        for mode in ("deletion", "insertion")
    )
    return f"{aucs} ({'/'.join(config.baselines)})"
