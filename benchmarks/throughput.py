"""CPU throughput of B-cos Vision Transformers against their standard twins.

Reproduce the full benchmark (from the repository root)::

    .venv/bin/python benchmarks/throughput.py --settings a b --repeats 5 --warmup 2 \
        --json benchmarks/results/throughput.json

Smoke test (small batches; its numbers do not judge the targets)::

    .venv/bin/python benchmarks/throughput.py --quick --repeats 2 --warmup 1 --json /tmp/throughput_quick.json

Settings:
    a: ``bcos_vit_mini_patch4_28`` vs ``vit_mini_patch4_28`` (embed 192, depth 6, 3 heads, patch 4),
       28x28 RGB, 10 classes, batch 128.
    b: ``bcos_vit_tiny_patch16_224`` vs ``vit_tiny_patch16_224``, 224x224 RGB, 1000 classes, batch 32.
    m: the main job's model, ``bcos_vitc_micro_28`` with RoPE vs its twin, 28x28 grey, batch 64.

``--reference`` (settings a and b) also times the reference implementation (``bcos`` 0.1.3) built
with the same architecture: its train step (the same recipe step) and its exact explanation of the
whole batch in its own explanation mode (one backward pass, the fair batched comparison; its
``explain`` does one image at a time). Every train row carries the B-cos step's GFLOP/s (forward and
backward FLOPs counted once by ``torch.utils.flop_counter``) and their share of this machine's
measured 2048x2048 matrix-product rate in the precision used.

For every setting the B-cos model and its twin are timed interleaved (within each repeat every
measured function runs once, in turn, so machine noise hits all of them alike), after ``--warmup``
untimed rounds; the reported figure is the median over ``--repeats`` rounds. Measured: one full
training step of each family's recipe (fp32, and bf16 autocast where the CPU has native bfloat16 or
``--precisions`` asks for it; optionally ``torch.compile``d),
the eval-mode forward pass in ``torch.inference_mode()``, and for the B-cos model the exact
explanation of the whole batch (``bcosvit.explain``: one forward and one backward pass).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bcosvit
from bcosvit.app.allocator import keep_freed_memory
from bcosvit.app.precision import autocast, cpu_features, native_bf16, resolve_precision
from bcosvit.app.training.clipping import adaptive_clip_grad_
from bcosvit.app.training.losses import bce_uniform_off_labels
from bcosvit.fileio import atomic_write
from bcosvit.models.registry import twin_name

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "throughput.json"
SEED = 0
CPU = torch.device("cpu")

# Targets (issue 29), every setting unless named.
MAX_TRAIN_TIME_RATIO = 1.10  # B-cos train step time / standard, eager, fp32 and bf16
MAX_COMPILED_TIME_RATIO = 1.00  # the same, torch.compile'd
MAX_EXPLAIN_FORWARD_RATIO = 1.5  # B-cos explain time / B-cos forward time
MIN_BF16_SPEEDUP = {"b": 2.2, "m": 1.5}  # B-cos bf16 step speed / fp32 step speed
MIN_REFERENCE_TRAIN_SPEEDUP = 1.3  # eager fp32 train step speed / the reference's
MIN_REFERENCE_DEFAULT_SPEEDUP = 1.5  # compile + auto precision / the reference's eager fp32
MIN_REFERENCE_EXPLAIN_SPEEDUP = 2.0  # batched explanation speed / the reference's, batched

Step = Callable[[], object]
VS_STANDARD = "B-cos time / standard time"


@dataclass(frozen=True)
class Setting:
    """One model pair and its input batch."""

    key: str
    bcos_model: str
    batch: int
    quick_batch: int  # batch size under --quick
    image_size: int
    num_classes: int
    in_chans: int = 3
    model_options: dict[str, Any] = field(default_factory=dict)
    reference: bool = True  # the reference implementation builds this architecture (plain patches, sin-cos)

    @property
    def standard_model(self) -> str:
        return twin_name(self.bcos_model)

    def describe(self, batch: int) -> str:
        return (
            f"{self.bcos_model} vs {self.standard_model}, {self.image_size}x{self.image_size}x{self.in_chans}, "
            f"{self.num_classes} classes, batch {batch}"
        )


SETTINGS: dict[str, Setting] = {
    "a": Setting("a", "bcos_vit_mini_patch4_28", batch=128, quick_batch=16, image_size=28, num_classes=10),
    "b": Setting("b", "bcos_vit_tiny_patch16_224", batch=32, quick_batch=4, image_size=224, num_classes=1000),
    # the main job's model (recipe fmnist-demo): ViT_c micro with RoPE on Fashion-MNIST
    "m": Setting(
        "m",
        "bcos_vitc_micro_28",
        batch=64,
        quick_batch=8,
        image_size=28,
        num_classes=10,
        in_chans=1,
        model_options={"pos_embed": "rope"},
        reference=False,
    ),
}


@dataclass
class Row:
    """One line of the table: median seconds per batch of the B-cos model and of the standard twin.

    ``ratio`` is B-cos time / standard time, except for the explanation row, where it is
    explain time / B-cos forward time (``ratio_of`` says which).
    """

    setting: str
    metric: str
    batch: int
    bcos_times: list[float] | None = None
    standard_times: list[float] | None = None
    ratio: float | None = None
    ratio_of: str = VS_STANDARD
    errors: dict[str, str] = field(default_factory=dict)
    bcos_flops: float | None = None  # FLOPs of one B-cos step on the batch (train rows)
    peak_flops_per_s: float | None = None  # the machine's measured matrix-product rate in the row's precision

    @property
    def bcos_gflops_per_s(self) -> float | None:
        m = median(self.bcos_times)
        return self.bcos_flops / m / 1e9 if self.bcos_flops and m else None

    @property
    def peak_share(self) -> float | None:
        rate = self.bcos_gflops_per_s
        return rate * 1e9 / self.peak_flops_per_s if rate and self.peak_flops_per_s else None

    @property
    def bcos_images_per_s(self) -> float | None:
        return images_per_s(self.bcos_times, self.batch)

    @property
    def standard_images_per_s(self) -> float | None:
        return images_per_s(self.standard_times, self.batch)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bcos_median_s"] = median(self.bcos_times)
        out["standard_median_s"] = median(self.standard_times)
        out["bcos_images_per_s"] = self.bcos_images_per_s
        out["standard_images_per_s"] = self.standard_images_per_s
        out["bcos_gflops_per_s"] = self.bcos_gflops_per_s
        out["peak_share"] = self.peak_share
        return out


# --- Timing ------------------------------------------------------------------------------------
def median(times: Sequence[float] | None) -> float | None:
    return statistics.median(times) if times else None


def images_per_s(times: Sequence[float] | None, batch: int) -> float | None:
    m = median(times)
    return batch / m if m else None


def time_ratio(numerator: Sequence[float] | None, denominator: Sequence[float] | None) -> float | None:
    a, b = median(numerator), median(denominator)
    return a / b if a is not None and b else None


def time_interleaved(fns: Sequence[Step], repeats: int, warmup: int) -> list[list[float]]:
    """Run every function once per round, in turn; ``warmup`` untimed rounds, then ``repeats`` timed
    rounds. Returns, per function, its ``repeats`` wall-clock times in seconds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return times


# --- What is timed -----------------------------------------------------------------------------
def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """B-cos recipe: Adam lr 1e-3; standard recipe: AdamW lr 1e-3, weight decay 1e-4."""
    params = [p for p in model.parameters() if p.requires_grad]
    if model.is_bcos:
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


def recipe_loss(bcos: bool, logits: Tensor, labels: Tensor, one_hot: Tensor) -> Tensor:
    """B-cos: BCE with off-labels clamped to 1/C; standard: cross-entropy."""
    return bce_uniform_off_labels(logits, one_hot) if bcos else F.cross_entropy(logits, labels)


def clip_gradients(bcos: bool, params: list[nn.Parameter]) -> None:
    """B-cos: unit-wise adaptive clipping (0.01, eps 1e-3); standard: global grad-norm clipping at 1."""
    if bcos:
        adaptive_clip_grad_(params, 0.01, 1e-3)
    else:
        nn.utils.clip_grad_norm_(params, 1.0)


def train_step_fn(
    model: bcosvit.VisionTransformer, images: Tensor, labels: Tensor, precision: str = "fp32", compiled: bool = False
) -> Step:
    """One full training step of the model family's recipe: forward, loss, zero_grad, backward,
    clipping, optimizer step. The model is trained in place (pass a copy)."""
    bcos = model.is_bcos
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model)
    one_hot = F.one_hot(labels, model.num_classes).float()
    net = torch.compile(model) if compiled else model
    model.train()

    def step() -> None:
        with autocast(precision, CPU):
            logits = net(images)
        loss = recipe_loss(bcos, logits.float(), labels, one_hot)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(bcos, params)
        optimizer.step()

    return step


def forward_fn(model: nn.Module, images: Tensor) -> Step:
    """Eval-mode forward pass in ``torch.inference_mode()``."""

    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            model(images)

    return forward


def explain_fn(model: bcosvit.VisionTransformer, images: Tensor) -> Step:
    """Exact explanation of the predicted class for the whole batch (one backward pass)."""
    return lambda: bcosvit.explain(model, images)


# --- One setting ---------------------------------------------------------------------------------
def make_batch(setting: Setting, batch: int) -> tuple[Tensor, Tensor]:
    """Random images in [0, 1] and random labels, from a fixed seed."""
    generator = torch.Generator().manual_seed(SEED)
    shape = (batch, setting.in_chans, setting.image_size, setting.image_size)
    images = torch.rand(shape, generator=generator)
    labels = torch.randint(setting.num_classes, (batch,), generator=generator)
    return images, labels


def build_models(setting: Setting) -> tuple[bcosvit.VisionTransformer, bcosvit.VisionTransformer]:
    """The B-cos model and its standard twin, each initialised from the same fixed seed."""
    models = []
    for name in (setting.bcos_model, setting.standard_model):
        torch.manual_seed(SEED)
        model = bcosvit.create_model(
            name, in_chans=setting.in_chans, num_classes=setting.num_classes, **setting.model_options
        )
        if model.config.image_size != setting.image_size:
            raise ValueError(f"{name} takes {model.config.image_size}px images, the setting {setting.image_size}px")
        models.append(model)
    return models[0], models[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_precisions() -> list[str]:
    """fp32, and bf16 autocast only where the CPU computes bf16 natively (emulated, it is far slower than fp32:
    docs/results.md, "Precision")."""
    return ["fp32", "bf16"] if native_bf16(CPU) else ["fp32"]


def train_rows(
    setting: Setting,
    batch: int,
    models: Sequence[nn.Module],
    images: Tensor,
    labels: Tensor,
    repeats: int,
    warmup: int,
    precisions: Sequence[str] = ("fp32", "bf16"),
    peaks: dict[str, float] | None = None,
) -> list[Row]:
    """Train step in each precision, B-cos and standard interleaved (each on its own copy), with the
    B-cos step's FLOPs and the machine's matrix-product rate in that precision (``peaks``)."""
    rows = []
    for precision in precisions:
        metric = train_metric(precision)
        log(f"[{setting.key}] {metric} ...")
        steps = [train_step_fn(copy.deepcopy(m), images, labels, precision) for m in models]
        bcos_t, std_t = time_interleaved(steps, repeats, warmup)
        row = Row(setting.key, metric, batch, bcos_t, std_t, time_ratio(bcos_t, std_t))
        row.bcos_flops = step_flops(models[0], images, labels, precision)
        row.peak_flops_per_s = (peaks or {}).get(precision)
        rows.append(row)
    return rows


def train_metric(precision: str, compiled: bool = False) -> str:
    return (
        f"train step {precision}"
        + (" autocast" if precision == "bf16" else "")
        + (" torch.compile" if compiled else "")
    )


def step_flops(model: nn.Module, images: Tensor, labels: Tensor, precision: str) -> float:
    """FLOPs of one train step's forward and backward (``torch.utils.flop_counter``: matrix products
    and convolutions), on a copy of ``model``."""
    from torch.utils.flop_counter import FlopCounterMode

    step = train_step_fn(copy.deepcopy(model), images, labels, precision)
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def matmul_peaks(precisions: Sequence[str], size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """This machine's rate (FLOP/s) of a ``size`` x ``size`` matrix product in each precision, median
    of ``repeats`` after one warm-up (bf16: the product of bf16 tensors, as autocast runs it)."""
    peaks = {}
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        (times,) = time_interleaved([lambda a=a, b=b: a @ b], repeats, 1)
        peaks[precision] = 2 * size**3 / median(times)
    return peaks


def inference_rows(
    setting: Setting, batch: int, models: Sequence[bcosvit.VisionTransformer], images: Tensor, repeats: int, warmup: int
) -> list[Row]:
    """Forward (both families) and B-cos explanation, all three interleaved."""
    log(f"[{setting.key}] forward + explain ...")
    bcos, standard = models
    fns = [forward_fn(bcos, images), forward_fn(standard, images), explain_fn(bcos, images)]
    bcos_fwd, std_fwd, explain_t = time_interleaved(fns, repeats, warmup)
    return [
        Row(setting.key, "forward (inference_mode)", batch, bcos_fwd, std_fwd, time_ratio(bcos_fwd, std_fwd)),
        Row(
            setting.key,
            "explain (B-cos only)",
            batch,
            explain_t,
            None,
            time_ratio(explain_t, bcos_fwd),
            ratio_of="explain time / B-cos forward time",
        ),
    ]


def short_error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def compiled_row(
    setting: Setting,
    batch: int,
    models: Sequence[nn.Module],
    images: Tensor,
    labels: Tensor,
    repeats: int,
    warmup: int,
    precision: str = "fp32",
    peaks: dict[str, float] | None = None,
) -> Row:
    """``torch.compile``d train step in ``precision``; a family whose compilation fails is reported, not raised."""
    metric = train_metric(precision, compiled=True)
    log(f"[{setting.key}] {metric} (the first call compiles) ...")
    row = Row(setting.key, metric, batch)
    row.peak_flops_per_s = (peaks or {}).get(precision)
    families = ("bcos", "standard")
    working: dict[str, Step] = {}
    for family, model in zip(families, models):
        try:
            step = train_step_fn(copy.deepcopy(model), images, labels, precision, compiled=True)
            step()  # compilation happens here, on top of the --warmup rounds
            working[family] = step
        except Exception as exc:  # dynamo/inductor raise many types; report them as a row
            row.errors[family] = short_error(exc)
    if working:
        try:
            times = time_interleaved(list(working.values()), repeats, warmup)
        except Exception as exc:  # e.g. a recompilation that fails after the first call
            row.errors.update({family: short_error(exc) for family in working})
        else:
            measured = dict(zip(working, times))
            row.bcos_times, row.standard_times = measured.get("bcos"), measured.get("standard")
            row.ratio = time_ratio(row.bcos_times, row.standard_times)
            row.bcos_flops = step_flops(models[0], images, labels, precision)
    return row


# --- The reference implementation ------------------------------------------------------------------
VS_REFERENCE = "bcosvit time / reference time"


def reference_model(model: bcosvit.VisionTransformer) -> nn.Module:
    """The reference implementation's (``bcos`` 0.1.3) B-cos SimpleViT with ``model``'s architecture
    (its ImageNet experiment's layers: B-cos linear and conv layers with B = 2, bias-free norms, logit
    bias log(1/(C-1))), randomly initialised; it reads the encoded ``[x, 1-x]`` images."""
    import math
    import warnings
    from functools import partial

    from bcos.experiments.utils import Experiment
    from bcos.models.vit import SimpleViT
    from bcos.modules.bcosconv2d import BcosConv2d
    from bcos.modules.bcoslinear import BcosLinear
    from bcos.modules.common import BcosSequential
    from bcos.modules.logitlayer import LogitLayer

    from bcosvit.models.vit import hidden_width

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        experiment = Experiment("ImageNet", "vit_final", "bcos_simple_vit_ti_patch16_224").config["model"]
    c = model.config
    args = {**experiment["args"], "num_classes": c.num_classes, "channels": 2 * c.in_chans}
    layer_args = experiment["bcos_args"]
    vit = SimpleViT(
        image_size=c.image_size,
        patch_size=c.patch_size,
        dim=c.embed_dim,
        depth=c.depth,
        heads=c.num_heads,
        mlp_dim=hidden_width(c.embed_dim, c.mlp_ratio),
        linear_layer=partial(BcosLinear, **layer_args),
        conv2d_layer=partial(BcosConv2d, **layer_args),
        **args,
    )
    reference = BcosSequential(vit, LogitLayer(logit_bias=math.log(1 / (c.num_classes - 1))))
    reference.is_bcos, reference.num_classes = True, c.num_classes  # what train_step_fn reads
    return reference


def reference_explain_fn(reference: nn.Module, encoded: Tensor) -> Step:
    """The reference model's exact explanation of the predicted class for the whole batch in its own
    explanation mode: one forward and one backward pass to the input only (no parameter gradients)."""

    def explain() -> Tensor:
        reference.eval()
        with reference.explanation_mode():
            x = encoded.detach().requires_grad_(True)
            logits = reference(x)
            (weights,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)
        return weights

    return explain


def reference_rows(
    setting: Setting, batch: int, model: bcosvit.VisionTransformer, images: Tensor, labels: Tensor,
    repeats: int, warmup: int,
) -> list[Row]:  # fmt: skip
    """bcosvit's B-cos model against the reference's, interleaved: the eager fp32 train step of the
    same recipe and the batched exact explanation."""
    log(f"[{setting.key}] against the reference implementation (bcos 0.1.3) ...")
    reference = reference_model(model)
    encoded = model.encode(images).detach()
    fns = [
        train_step_fn(copy.deepcopy(model), images, labels),
        train_step_fn(reference, encoded, labels),
        explain_fn(model, images),
        reference_explain_fn(reference, encoded),
    ]
    ours_train, ref_train, ours_explain, ref_explain = time_interleaved(fns, repeats, warmup)
    return [
        Row(setting.key, "vs reference: train step fp32", batch, ours_train, ref_train,
            time_ratio(ours_train, ref_train), ratio_of=VS_REFERENCE),
        Row(setting.key, "vs reference: explain, whole batch", batch, ours_explain, ref_explain,
            time_ratio(ours_explain, ref_explain), ratio_of=VS_REFERENCE),
    ]  # fmt: skip


def default_path_row(rows: Sequence[Row], setting: str) -> Row | None:
    """bcosvit's default train path (the recipes: torch.compile, precision auto) against the
    reference's default (eager float32), from rows measured in this run."""
    auto = resolve_precision("auto", CPU).precision
    ours = find_row(rows, setting, train_metric(auto, compiled=True))
    reference = find_row(rows, setting, "vs reference: train step fp32")
    if not (ours and reference and ours.bcos_times and reference.standard_times):
        return None
    return Row(
        setting, f"vs reference: default path ({auto} compiled vs its eager fp32)", ours.batch, ours.bcos_times,
        reference.standard_times, time_ratio(ours.bcos_times, reference.standard_times), ratio_of=VS_REFERENCE,
    )  # fmt: skip


def benchmark_setting_rows(
    setting: Setting,
    batch: int,
    repeats: int,
    warmup: int,
    precisions: Sequence[str],
    inference: bool = True,
    compiled: bool = False,
    reference: bool = False,
    peaks: dict[str, float] | None = None,
) -> list[Row]:
    """Train steps in each precision, then (``inference``) forward and explanation, then
    (``compiled``) the ``torch.compile``d train step in each precision, then (``reference``, where
    the reference builds the setting's architecture) the rows against the reference, for one
    setting's model pair."""
    models = build_models(setting)
    images, labels = make_batch(setting, batch)
    rows = train_rows(setting, batch, models, images, labels, repeats, warmup, precisions, peaks)
    if inference:
        rows[1:1] = inference_rows(setting, batch, models, images, repeats, warmup)
    if compiled:
        rows += [
            compiled_row(setting, batch, models, images, labels, repeats, warmup, precision, peaks)
            for precision in precisions
        ]
    if reference and setting.reference:
        rows += reference_rows(setting, batch, models[0], images, labels, repeats, warmup)
        rows += [row for row in [default_path_row(rows, setting.key)] if row is not None]
    return rows


def benchmark_setting(setting: Setting, args: argparse.Namespace) -> tuple[int, list[Row]]:
    """All rows of one setting; returns the batch size used and the rows."""
    batch = setting.quick_batch if args.quick else setting.batch
    log(f"[{setting.key}] {setting.describe(batch)}")
    rows = benchmark_setting_rows(
        setting, batch, args.repeats, args.warmup, args.precisions, compiled=args.compile,
        reference=args.reference, peaks=args.peaks,
    )  # fmt: skip
    return batch, rows


# --- Report --------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def apply_allocator_policy(glibc_defaults: bool) -> str:
    """The bcosvit command's memory policy (``bcosvit.app.allocator``) unless ``glibc_defaults``;
    returns which allocator settings the run measures under."""
    kept = False if glibc_defaults else keep_freed_memory()
    return "freed memory kept (bcosvit's)" if kept else "malloc defaults"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    info["cpu_features"] = cpu_features()
    info["precision_auto"] = str(resolve_precision("auto", CPU))
    with contextlib.suppress(OSError):
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    return info


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("load_average_1_5_15min")
    load_text = f", load average {load[0]:.2f}" if load else ""
    return (
        f"machine: {info['cpu_model']}, {info['cpu_count']} cores (os.cpu_count), "
        f"torch.get_num_threads() = {info['torch_num_threads']}, torch {info['torch_version']}, "
        f"{info['date']}{load_text}; precision auto: {info['precision_auto']}"
        + (f"; {info['allocator']}" if "allocator" in info else "")
    )


def find_row(rows: Sequence[Row], setting: str, metric: str) -> Row | None:
    return next((r for r in rows if r.setting == setting and r.metric == metric), None)


def evaluate_targets(rows: Sequence[Row], settings: Sequence[str]) -> list[dict[str, Any]]:
    """The targets (issue 29) with their measured values; ``passed`` is None when not measured."""

    def check(name: str, value: float | None, limit: float, at_most: bool) -> dict[str, Any]:
        passed = None if value is None else (value <= limit if at_most else value >= limit)
        return {"target": name, "value": value, "limit": limit, "passed": passed}

    def ratio(key: str, metric: str) -> float | None:
        row = find_row(rows, key, metric)
        return row.ratio if row else None

    def speedup(key: str, slow: str, fast: str) -> float | None:
        a, b = find_row(rows, key, slow), find_row(rows, key, fast)
        return time_ratio(a.bcos_times, b.bcos_times) if a and b else None

    def inverse(value: float | None) -> float | None:
        return 1 / value if value else None

    targets = []
    for key in settings:
        for precision in ("fp32", "bf16"):
            targets.append(
                check(f"({key}) B-cos / twin train time, eager {precision}", ratio(key, train_metric(precision)),
                      MAX_TRAIN_TIME_RATIO, at_most=True)
            )  # fmt: skip
            targets.append(
                check(f"({key}) B-cos / twin train time, compiled {precision}",
                      ratio(key, train_metric(precision, compiled=True)), MAX_COMPILED_TIME_RATIO, at_most=True)
            )  # fmt: skip
        targets.append(
            check(f"({key}) explain time / forward time", ratio(key, "explain (B-cos only)"),
                  MAX_EXPLAIN_FORWARD_RATIO, at_most=True)
        )  # fmt: skip
    for key, limit in MIN_BF16_SPEEDUP.items():
        if key in settings:
            value = speedup(key, train_metric("fp32"), train_metric("bf16"))
            targets.append(check(f"({key}) B-cos bf16 step speed / fp32 step speed", value, limit, at_most=False))
    for key in settings:
        if find_row(rows, key, "vs reference: train step fp32") is None:
            continue
        targets += [
            check(f"({key}) train step speed / reference's, eager fp32",
                  inverse(ratio(key, "vs reference: train step fp32")), MIN_REFERENCE_TRAIN_SPEEDUP, at_most=False),
            check(f"({key}) batched explanation speed / reference's",
                  inverse(ratio(key, "vs reference: explain, whole batch")), MIN_REFERENCE_EXPLAIN_SPEEDUP,
                  at_most=False),
        ]  # fmt: skip
        default = next((r for r in rows if r.setting == key and r.metric.startswith("vs reference: default")), None)
        targets.append(
            check(f"({key}) default path speed / reference's defaults", inverse(default.ratio if default else None),
                  MIN_REFERENCE_DEFAULT_SPEEDUP, at_most=False)
        )  # fmt: skip
    return targets


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[Row]) -> str:
    header = ("setting", "metric", "batch", "B-cos img/s", "standard img/s", "ratio B-cos/std time", "B-cos GFLOP/s")
    lines: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    for row in rows:
        bcos, std = fmt(row.bcos_images_per_s), fmt(row.standard_images_per_s)
        if "bcos" in row.errors:
            bcos = "failed"
        if "standard" in row.errors:
            std = "failed"
        ratio = fmt(row.ratio, ".3f")
        if row.ratio is not None and row.ratio_of != VS_STANDARD:
            ratio += " *"
            notes.append(
                f"* ({row.setting}) {row.metric}: ratio is {row.ratio_of}"
                + ("; the standard column is the reference" if row.ratio_of == VS_REFERENCE else "")
            )
        notes += [f"! ({row.setting}) {row.metric}, {family} failed: {error}" for family, error in row.errors.items()]
        rate = fmt(row.bcos_gflops_per_s, ".0f")
        if row.peak_share is not None:
            rate += f" ({row.peak_share:.0%} of peak)"
        lines.append((row.setting, row.metric, str(row.batch), bcos, std, ratio, rate))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text + notes)


def format_targets(targets: Sequence[dict[str, Any]], quick: bool) -> str:
    lines = ["targets" + (" (--quick: smaller batches than the benchmark's, indicative only)" if quick else "") + ":"]
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["passed"]]
        lines.append(f"  [{verdict}] {t['target']}: measured {fmt(t['value'], '.3f')}")
    return "\n".join(lines)


def run_record(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """The command line that produced a result file and its parsed options, for the JSON."""
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [sys.argv[0], *argv])])
    return {"command": command, "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def write_results(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# --- Command line --------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=sorted(SETTINGS),
        default=sorted(SETTINGS),
        help="which settings to run (a: mini ViT 28x28 batch 128; b: tiny ViT 224x224 batch 32; m: the main job's)",
    )
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds before timing")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch.set_num_threads(N); None keeps torch's own choice"
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd train steps")
    parser.add_argument(
        "--reference", action="store_true", help="also time the reference implementation (bcos 0.1.3), settings a, b"
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "bf16"],
        default=default_precisions(),
        help="train-step precisions to time (default: bf16 only where this CPU has it natively)",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write all numbers")
    parser.add_argument(
        "--glibc-malloc-defaults",
        action="store_true",
        help="leave glibc's malloc settings (default: the bcosvit command's, bcosvit.app.allocator)",
    )
    quick_batches = ", ".join(f"{key}: {s.quick_batch}" for key, s in SETTINGS.items())
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: small batches ({quick_batches}); targets are then indicative only",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = apply_allocator_policy(args.glibc_malloc_defaults)
    settings = list(dict.fromkeys(args.settings))
    machine = machine_info()
    machine["allocator"] = allocator
    log(machine_line(machine))
    args.peaks = matmul_peaks(args.precisions)
    machine["matmul_2048_gflops_per_s"] = {k: v / 1e9 for k, v in args.peaks.items()}
    log("2048x2048 matrix product: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in args.peaks.items()))

    rows: list[Row] = []
    setting_info: dict[str, Any] = {}
    for key in settings:
        setting = SETTINGS[key]
        batch, setting_rows = benchmark_setting(setting, args)
        rows += setting_rows
        setting_info[key] = {
            **asdict(setting),
            "standard_model": setting.standard_model,
            "batch_used": batch,
            "description": setting.describe(batch),
        }
    targets = evaluate_targets(rows, settings)

    print(machine_line(machine))
    for key in settings:
        print(f"setting {key}: {setting_info[key]['description']}")
    print(
        f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up rounds"
        + (" (--quick)" if args.quick else "")
    )
    print()
    print(format_table(rows))
    print()
    print(format_targets(targets, args.quick))

    write_results(
        args.json,
        {
            **run_record(args, argv),
            "machine": machine,
            "settings": setting_info,
            "rows": [row.to_dict() for row in rows],
            "targets": targets,
        },
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
