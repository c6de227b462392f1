"""Which timm ViT families ``bcosvit.bcosification.from_timm`` converts, and how well.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timm_families.py \
        --json benchmarks/results/timm_families.json
    .venv/bin/python benchmarks/timm_families.py --families vit_tiny_patch16_224 deit_small_patch16_224 \
        --json /tmp/timm_families.json

Every family of ``FAMILIES`` is built by timm at random init (``pretrained=False``; nothing is
downloaded) with its published depth and width at ``--image-size`` pixels (default 112, a multiple
of both patch 14 and patch 16; ``--depth N`` overrides the depth for speed). ``.dino`` and ``.mae``
are built headless (``num_classes=0``); the others keep timm's default head for their name (some,
e.g. DINOv2, SigLIP, DINOv3 and EVA-02 tiny, are headless by default). Every 1-D parameter (norm
scales, biases, LayerScale) is then drawn at random from a fixed seed, as ``tests/test_bcosification.py``
does, so that a misplaced one shows in the differences (``--timm-init`` keeps timm's init: zero
biases, unit norm scales).

Per family the row reports the timm class, the architectural features that matter for conversion
(class token, registers, LayerScale, pre-norm, MLP activation, query/key norms, positions, pooling,
headless) and the outcome of ``from_timm(model)``: ``converted``, ``refused: <ConfigError message>``
or ``error: <type>: <message>`` (anything but ``ConfigError`` is a bug). For converted families:

- ``twin_rel_diff``: ``check_same_function(twin, model, mean, std, images=4)``: the float64 relative
  difference of the twin's logits (features, headless) and timm's on a seeded batch of 4 images in
  [0, 1], timm fed ``(x - mean) / std`` from ``model.pretrained_cfg``;
- ``bcos_b1_rel_diff``: the same difference for ``bcosify(twin)`` (B = 1, biases kept);
- ``twin_rel_diff_f64``, ``bcos_b1_rel_diff_f64``: the same two for the conversion of a float64 copy
  of the timm model (``from_timm(model.double())``): what is left is the conversion's own error
  (~1e-15 when faithful), where the float32 conversion adds float32 rounding of the weights it
  computes (the class token's folded position, the first layer's folded normalisation: ~1e-10 for
  the twin, ~1e-7 for the B-cos model);
- ``params``: the parameter counts of the timm model, the twin and the B-cos model;
- ``images_per_s``: float32 eval-mode forward passes under ``torch.inference_mode()`` of the timm
  model (fed the batch normalised beforehand), the twin and the B-cos model, on one seeded batch of
  ``--batch`` (8) images; the three are timed interleaved, ``--warmup`` (3) untimed rounds, then the
  median of ``--repeats`` (5) timed rounds;
- ``completeness``: the final configuration ``remove_biases(bcosify(twin))`` after ``set_b(., 2.0)``,
  in float64, explained by ``bcosvit.explain`` on the 4-image batch (the predicted class):
  the largest ``relative_completeness_error`` (``|logit - w(x)·[x, 1-x] - positional - logit_bias|
  / |logit|``), the largest absolute ``completeness_error`` and the largest positional term.

A failing measurement of a converted family is recorded as ``error: <type>: <message>`` in its
field and the run goes on. Results go to stdout (a markdown table) and to ``--json``, with the
machine line of ``benchmarks/throughput.py`` and the torch and timm versions.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]  # this tree's bcosvit

from throughput import (  # noqa: E402
    forward_fn,
    images_per_s,
    machine_info,
    machine_line,
    positive_int,
    run_record,
    time_interleaved,
)

import bcosvit  # noqa: E402
from bcosvit.bcosification import bcosify, check_same_function, from_timm, remove_biases, set_b  # noqa: E402
from bcosvit.errors import ConfigError  # noqa: E402
from bcosvit.fileio import write_json  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "timm_families.json"
FAMILIES = [
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "deit_small_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_small_patch16_224.dino",
    "vit_base_patch16_224.mae",
    "vit_medium_patch16_gap_256",
    "vit_betwixt_patch16_reg4_gap_256",
    "vit_base_patch16_reg4_gap_256",
    "vit_base_patch16_clip_224",
    "vit_base_patch16_clip_quickgelu_224",
    "vit_base_patch16_siglip_224",
    "vit_base_patch16_siglip_gap_224",
    "vit_small_patch16_rope_224",
    "vit_base_patch16_rope_reg1_gap_256",
    "vit_small_patch16_dinov3",
    "eva02_tiny_patch14_224",
    "vit_small_patch16_rope_mixed_224",
    "eva02_base_patch14_224.mim_in22k",
    "vit_relpos_small_patch16_224",
]
HEADLESS = {"vit_small_patch16_224.dino", "vit_base_patch16_224.mae"}  # built with num_classes=0
SEED = 0
PROBE_IMAGES = 4
FINAL_B = 2.0


# --- Models ---------------------------------------------------------------------------------------
def randomised(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Every 1-D parameter random (norm scales and LayerScale in [0.5, 1.5], biases in [-0.5, 0.5]),
    as in ``tests/test_bcosification.py``, so that a misplaced one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            low, high = (-0.5, 0.5) if name.endswith("bias") else (0.5, 1.5)
            if param.ndim == 1:
                param.copy_(torch.rand(param.shape, generator=generator) * (high - low) + low)
    return model


def build_timm(name: str, image_size: int, depth: int | None, timm_init: bool) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {"img_size": image_size}
    if depth is not None:
        kwargs["depth"] = depth
    if name in HEADLESS:
        kwargs["num_classes"] = 0
    torch.manual_seed(SEED)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return (model if timm_init else randomised(model)).eval()


def is_identity(module: object) -> bool:
    return module is None or isinstance(module, nn.Identity)


def activation_name(mlp: nn.Module) -> str:
    act = getattr(mlp, "act", None)
    if act is None:
        return type(mlp).__name__
    text = type(act).__name__
    if isinstance(act, nn.GELU) and act.approximate != "none":
        text += f"({act.approximate})"
    if type(mlp).__name__ not in ("Mlp",):  # gated MLPs (GluMlp, SwiGLU): the gate's activation
        text = f"{type(mlp).__name__}/{text}"
    return text


def features(model: nn.Module) -> dict[str, Any]:
    """What of the timm model matters for the conversion (timm's VisionTransformer and Eva)."""
    block = model.blocks[0]
    attn = block.attn
    reg_token = getattr(model, "reg_token", None)
    registers = int(getattr(model, "num_reg_tokens", 0) or (reg_token.shape[1] if reg_token is not None else 0))
    layerscale = not is_identity(getattr(block, "ls1", None)) or getattr(block, "gamma_1", None) is not None
    rope = getattr(model, "rope", None)
    learned = getattr(model, "pos_embed", None) is not None
    positions = "+".join(p for p, on in (("learned", learned), ("rope", rope is not None)) if on) or "none"
    return {
        "depth": len(model.blocks),
        "embed_dim": int(model.embed_dim),
        "num_heads": int(attn.num_heads),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "image_size": int(model.patch_embed.img_size[0]),
        "class_token": getattr(model, "cls_token", None) is not None,
        "distillation_token": getattr(model, "dist_token", None) is not None,
        "registers": registers,
        "layerscale": bool(layerscale),
        "pre_norm": not is_identity(getattr(model, "norm_pre", None)),
        "activation": activation_name(block.mlp),
        "qk_norm": not is_identity(getattr(attn, "q_norm", None)),
        "attn_norm": not is_identity(getattr(attn, "norm", None)),
        "mlp_norm": not is_identity(getattr(block.mlp, "norm", None)),
        "positions": positions if rope is None else f"{positions} ({type(rope).__name__})",
        "pool": str(model.global_pool) + (" (attn_pool)" if getattr(model, "attn_pool", None) is not None else ""),
        "final_norm": next((n for n in ("fc_norm", "norm") if not is_identity(getattr(model, n, None))), "none"),
        "headless": int(model.num_classes) == 0,
        "num_outputs": int(model.num_classes) or int(model.num_features),
    }


def feature_text(f: dict[str, Any]) -> str:
    parts = [f"d{f['depth']}/w{f['embed_dim']}/p{f['patch_size']}"]
    parts += ["cls"] if f["class_token"] else ["no cls"]
    parts += ["dist"] if f["distillation_token"] else []
    parts += [f"reg{f['registers']}"] if f["registers"] else []
    parts += ["LS"] if f["layerscale"] else []
    parts += ["pre-norm"] if f["pre_norm"] else []
    parts += [f["activation"]]
    parts += ["qk-norm"] if f["qk_norm"] else []
    parts += ["attn-norm"] if f["attn_norm"] else []
    parts += ["mlp-norm"] if f["mlp_norm"] else []
    parts += [f"pos={f['positions'].split(' ')[0]}", f"pool={f['pool'].split(' ')[0]}", f"final={f['final_norm']}"]
    parts += ["headless"] if f["headless"] else []
    return ", ".join(parts)


# --- Measurements ---------------------------------------------------------------------------------
def error_text(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {' '.join(str(exc).split())}"


def probe_batch(channels: int, size: int, images: int = PROBE_IMAGES) -> Tensor:
    """The seeded float64 batch in [0, 1] that ``check_same_function`` draws."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(images, channels, size, size, generator=generator, dtype=torch.float64)


def normalised(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    shape = (1, -1, 1, 1)
    mean_t, std_t = (torch.tensor(v, dtype=images.dtype).view(shape) for v in (mean, std))
    return (images - mean_t) / std_t


@torch.no_grad()
def relative_difference(ours: nn.Module, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> float:
    """``check_same_function``'s measure without its tolerance: ``max |ours - timm| / max |timm|`` in
    float64 on the seeded probe batch (``ours`` on ``x``, timm on ``(x - mean) / std``)."""
    probe = probe_batch(ours.in_chans, ours.image_size)
    a = copy.deepcopy(ours).double().eval()(probe)
    b = copy.deepcopy(model).double().eval()(normalised(probe, mean, std))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def float64_differences(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> tuple[float, float]:
    """The twin's and the B = 1 model's relative differences when a float64 copy of ``model`` is converted."""
    model64 = copy.deepcopy(model).double()
    twin64 = from_timm(model64)
    return (
        check_same_function(twin64, model64, mean, std, images=PROBE_IMAGES),
        relative_difference(bcosify(twin64), model64, mean, std),
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def throughput(
    model: nn.Module,
    twin: nn.Module,
    bcos: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    size = twin.image_size
    generator = torch.Generator().manual_seed(SEED)
    images = torch.rand(args.batch, twin.in_chans, size, size, generator=generator)
    timm_images = normalised(images, mean, std)
    fns = [forward_fn(model.float(), timm_images), forward_fn(twin.float(), images), forward_fn(bcos.float(), images)]
    times = time_interleaved(fns, args.repeats, args.warmup)
    result: dict[str, Any] = {name: images_per_s(t, args.batch) for name, t in zip(("timm", "twin", "bcos"), times)}
    result["times_s"] = dict(zip(("timm", "twin", "bcos"), times))
    return result


def completeness(bcos: bcosvit.VisionTransformer) -> dict[str, Any]:
    """``remove_biases`` of a B = 2 copy of ``bcos``, explained in float64 on the probe batch."""
    final = copy.deepcopy(bcos)
    set_b(final, FINAL_B)
    final = remove_biases(final).double().eval()
    expl = bcosvit.explain(final, probe_batch(final.in_chans, final.image_size))
    return {
        "b": final.config.b,
        "bias": final.config.bias,
        "max_relative_error": float(expl.relative_completeness_error.max()),
        "max_error": float(expl.completeness_error.max()),
        "max_abs_output": float(expl.outputs.abs().max()),
        "max_abs_positional": float(expl.positional.abs().max()),
    }


def measure(step: str, row: dict[str, Any], fn: Any) -> Any:
    """``fn()``, or None with ``row[step]`` the error text when it raises."""
    try:
        return fn()
    except Exception as exc:  # a measurement bug: shown in its field, the run goes on
        row[step] = error_text(exc)
        return None


def family_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    row: dict[str, Any] = {"family": name}
    try:
        model = build_timm(name, args.image_size, args.depth, args.timm_init)
    except Exception as exc:
        row["outcome"] = "error: building the timm model: " + error_text(exc).removeprefix("error: ")
        row["seconds"] = time.perf_counter() - started
        return row
    row["timm_class"] = f"{type(model).__module__}.{type(model).__name__}"
    row["features"] = measure("features", row, lambda: features(model))
    row["params"] = {"timm": count_params(model)}
    try:
        twin = from_timm(model)
    except ConfigError as exc:
        row["outcome"] = f"refused: {exc}"
    except Exception as exc:
        row["outcome"] = error_text(exc)
    else:
        row["outcome"] = "converted"
        cfg = model.pretrained_cfg
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        row["twin_rel_diff"] = measure(
            "twin_rel_diff", row, lambda: check_same_function(twin, model, mean, std, images=PROBE_IMAGES)
        )
        bcos = measure("bcos_b1_rel_diff", row, lambda: bcosify(twin))
        if bcos is not None:
            row["bcos_b1_rel_diff"] = measure(
                "bcos_b1_rel_diff", row, lambda: relative_difference(bcos, model, mean, std)
            )
        exact = measure("twin_rel_diff_f64", row, lambda: float64_differences(model, mean, std))
        if exact is not None:
            row["twin_rel_diff_f64"], row["bcos_b1_rel_diff_f64"] = exact
        if bcos is not None:
            row["params"].update(twin=count_params(twin), bcos=count_params(bcos))
            row["images_per_s"] = measure("images_per_s", row, lambda: throughput(model, twin, bcos, mean, std, args))
            row["completeness"] = measure("completeness", row, lambda: completeness(bcos))
    row["seconds"] = time.perf_counter() - started
    return row


# --- Output ---------------------------------------------------------------------------------------
def fmt_number(value: Any, spec: str) -> str:
    if isinstance(value, str):
        return value
    return "-" if value is None else format(value, spec)


def pair(row: dict[str, Any], key: str) -> str:
    """The float32 and float64 conversions' differences, ``-`` for both when the family was not converted."""
    if key not in row and f"{key}_f64" not in row:
        return "-"
    return f"{fmt_number(row.get(key), '.1e')} / {fmt_number(row.get(key + '_f64'), '.1e')}"


def fmt_params(params: dict[str, int]) -> str:
    return " / ".join(f"{params[k] / 1e6:.2f}M" for k in ("timm", "bcos") if k in params)


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "| timm name | class | features | outcome | twin Δ f32 / f64 | B=1 Δ f32 / f64 | params timm / B-cos | "
        "img/s timm / twin / B-cos | compl. rel. err. (B=2, no bias) | s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        speed = r.get("images_per_s")
        if isinstance(speed, dict):
            speed = " / ".join(fmt_number(speed[k], ".1f") for k in ("timm", "twin", "bcos"))
        compl = r.get("completeness")
        if isinstance(compl, dict):
            compl = fmt_number(compl["max_relative_error"], ".1e")
        feats = r.get("features")
        cells = [
            r["family"],
            r.get("timm_class", "-").rsplit(".", 1)[-1],
            feature_text(feats) if isinstance(feats, dict) else (feats or "-"),
            r["outcome"],
            pair(r, "twin_rel_diff"),
            pair(r, "bcos_b1_rel_diff"),
            fmt_params(r.get("params", {})),
            speed or "-",
            compl or "-",
            f"{r['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def select_families(names: Sequence[str]) -> list[str]:
    """Each name as given when it is one of ``FAMILIES`` or no part of any; else the families it is part of."""
    chosen: list[str] = []
    for name in names:
        matches = [name] if name in FAMILIES else [f for f in FAMILIES if name in f] or [name]
        chosen += [m for m in matches if m not in chosen]
    return chosen


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families",
        nargs="+",
        default=FAMILIES,
        metavar="NAME",
        help="timm names, or parts of the default families' names (dinov2: both DINOv2 families); "
        f"default: all {len(FAMILIES)}",
    )
    parser.add_argument("--image-size", type=positive_int, default=112, help="img_size given to timm (default 112)")
    parser.add_argument("--depth", type=positive_int, default=None, help="override the published depth (speed)")
    parser.add_argument("--batch", type=positive_int, default=8, help="throughput batch (default 8)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--timm-init", action="store_true", help="keep timm's init of the 1-D parameters")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import timm

    args = parse_args(argv)
    args.families = select_families(args.families)
    info = machine_info()
    print(machine_line(info) + f"; timm {timm.__version__}", flush=True)
    rows = []
    for name in args.families:
        row = family_row(name, args)
        print(f"{name}: {row['outcome'][:100]} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    print(table(rows))
    data = {
        "benchmark": "timm_families",
        "machine": info,
        "machine_line": machine_line(info),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "run": run_record(args, argv),
        "rows": rows,
    }
    write_json(args.json, data)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
