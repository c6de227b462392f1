"""The ``bcosvit`` command: ``models``, ``train``, ``align``, ``explain``, ``evaluate``, ``serve`` and
``convert`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import BcosVitError
from .allocator import keep_freed_memory

if TYPE_CHECKING:
    from .training.recipes import Recipe


def _count(name: str) -> tuple[int, object]:
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(name)
    return sum(p.numel() for p in model.parameters()), model.config


def weights_label(record) -> str:
    """The ``weights`` column of ``bcosvit models`` for a ``bcosvit.weights.PretrainedWeights`` record."""
    from ..weights import SHIPPED

    if record.weights == SHIPPED:
        return SHIPPED
    return f"imagenet {record.top1:.1f}% ({record.status})"


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import list_models
    from ..weights import list_pretrained_weights

    weights = {record.name: weights_label(record) for record in list_pretrained_weights()}
    names = list_models(args.pattern)
    if not names:
        print(f"no registered model matches {args.pattern!r}")
        return 1
    header = (
        f"{'name':30s} {'family':8s} {'params':>9s} {'input':>9s} {'tokens':>8s} "
        f"{'dim':>5s} {'depth':>5s} {'heads':>5s}  weights"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        count, cfg = _count(name)
        grid = cfg.image_size // cfg.patch_size
        tokeniser = "stem" if cfg.stem_channels else f"p{cfg.patch_size}"
        print(
            f"{name:30s} {'B-cos' if cfg.bcos else 'standard':8s} {count / 1e6:8.2f}M "
            f"{cfg.in_chans}x{cfg.image_size:<3d}   {grid}x{grid} {tokeniser:>4s} {cfg.embed_dim:5d} {cfg.depth:5d} "
            f"{cfg.num_heads:5d}  {weights.get(name, '')}"
        )
    print(f"\n{len(names)} models; B-cos models start with 'bcos_', their standard twins drop the prefix.")
    print(
        "weights: 'shipped' inside the package (--model NAME); 'imagenet' published top-1 accuracy, downloaded "
        "once into torch.hub's cache or already 'cached' (--model NAME --pretrained imagenet)."
    )
    return 0


# the training options with a flag of their own (every option: --set KEY=VALUE)
TRAIN_FLAGS = ("model", "dataset", "data_dir", "epochs", "batch_size", "lr", "seed", "bcosify_from", "finetune_from")
# the recipe of `bcosvit train --finetune-from` without --recipe
FINETUNE_RECIPE = "finetune"


def command_line_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """``(settings, stage_settings)`` of the training flags given and ``--set`` (which wins)."""
    from .training.recipes import parse_settings

    settings, stage_settings = parse_settings(args.set or [])
    flags = {key: getattr(args, key, None) for key in TRAIN_FLAGS}
    return {**{key: value for key, value in flags.items() if value is not None}, **settings}, stage_settings


def train_run_from_args(args: argparse.Namespace) -> tuple[Recipe, Path]:
    """The recipe, with the command line's options applied, and the run folder of ``bcosvit train``.
    With ``--bcosify-from`` and no ``--model`` the model is the teacher's B-cos twin; ``--weights``
    is the weights file of a timm teacher (``--bcosify-from timm:NAME``). With ``--finetune-from``
    the recipe defaults to ``finetune``, the model is the source's, ``--pretrained`` chooses a
    registered name's weights and ``--weights`` is its published file (``finetune_pretrained``,
    ``finetune_weights``: the command line's replace the recipe's)."""
    from ..errors import ConfigError
    from .training.recipes import build_recipe, finetune_model_name, load_recipe
    from .training.teacher import bcos_twin_name, teacher_source

    if args.teacher_features:
        raise ConfigError(
            "--teacher-features is bcosvit align's: B-cosification (--bcosify-from) fine-tunes the teacher's logits, "
            "which need its head; align a B-cos student to a headless teacher's features with bcosvit align "
            "--teacher timm:NAME --teacher-features"
        )
    finetune = getattr(args, "finetune_from", None)
    if args.bcosify_from and finetune:
        raise ConfigError("--bcosify-from and --finetune-from both start the model from trained weights: give one")
    if args.weights and not (args.bcosify_from or finetune):
        raise ConfigError(
            "--weights is the weights file of the timm teacher of --bcosify-from timm:NAME, or the published .pth "
            "file of --finetune-from NAME; add one of them"
        )
    if getattr(args, "pretrained", None) and not finetune:
        raise ConfigError("--pretrained chooses the weights of --finetune-from NAME; add it")
    settings, stage_settings = command_line_settings(args)
    if args.bcosify_from:
        source = teacher_source(args.bcosify_from, args.weights)
        if settings["bcosify_from"] == args.bcosify_from:  # not replaced by --set bcosify_from=...
            settings["bcosify_from"] = source
        if "model" not in settings:
            settings["model"] = bcos_twin_name(source)
    if finetune:
        settings.setdefault("finetune_pretrained", args.pretrained or "auto")
        settings.setdefault("finetune_weights", os.path.abspath(args.weights) if args.weights else None)
        if "model" not in settings:
            settings["model"] = finetune_model_name(settings["finetune_from"])
    recipe_name = args.recipe or (FINETUNE_RECIPE if finetune else None)
    if recipe_name:
        recipe = load_recipe(recipe_name, settings, stage_settings)
    else:
        recipe = build_recipe("", {}, "TrainConfig's defaults (no --recipe)", settings, stage_settings)
    name = recipe.name or recipe.stages[0].config.model.replace(":", "-")  # bcos_timm:NAME -> bcos_timm-NAME
    out = Path(args.out) if args.out else Path("runs") / name
    return recipe, out


def cmd_train(args: argparse.Namespace) -> int:
    from .training.recipes import list_recipes
    from .training.runner import run_recipe

    if args.list_recipes:
        for name, description in list_recipes().items():
            print(f"{name:28s} {description}")
        return 0
    recipe, out = train_run_from_args(args)
    recipe_flag = f" --recipe {args.recipe}" if args.recipe else ""
    command = f"bcosvit train{recipe_flag} --out {out} --resume (plus the same options)"
    run_recipe(recipe, out, args.resume, not args.no_progress, args.stop_after, command)
    return 0


def align_run_from_args(args: argparse.Namespace) -> tuple[Recipe, Path]:
    """The recipe of ``bcosvit align`` with its alignment stages aligning to ``--teacher``: the
    student is the teacher B-cosified (B = 2, no biases) or, with ``--student``, a fresh model.
    ``--weights``: the weights file of a timm teacher (``timm:NAME``); ``--teacher-features``: only
    the teacher's features are aligned, and the B-cosified student gets a head for the dataset's
    classes (a headless teacher, ``num_classes=0``, or one trained on other classes)."""
    from ..errors import ConfigError
    from .training.recipes import load_recipe
    from .training.teacher import bcos_twin_name, teacher_source

    settings, stage_settings = command_line_settings(args)
    teacher = teacher_source(args.teacher, args.weights, args.teacher_features)
    if args.student:
        student = {"model": args.student, "bcosify_from": None}
    else:
        student = {"model": bcos_twin_name(teacher), "bcosify_from": teacher, "bcosify_warmup_epochs": 0.0}
    settings = {**student, **settings}
    stages = load_recipe(args.recipe, settings, stage_settings).stages
    aligning = [stage.name for stage in stages if stage.config.align_to]
    if not aligning:
        raise ConfigError(
            f"recipe {args.recipe} has no alignment stage (align_to); use an alignment recipe, e.g. fmnist-align"
        )
    if aligning == [""]:  # a recipe without stages
        settings["align_to"] = teacher
    for name in filter(None, aligning):
        stage_settings[name] = {**stage_settings.get(name, {}), "align_to": teacher}
    return load_recipe(args.recipe, settings, stage_settings), Path(args.out)


def cmd_align(args: argparse.Namespace) -> int:
    from .training.runner import run_recipe

    recipe, out = align_run_from_args(args)
    student = f" --student {args.student}" if args.student else ""
    student += f" --weights {args.weights}" if args.weights else ""
    student += " --teacher-features" if args.teacher_features else ""
    command = f"bcosvit align --teacher {args.teacher}{student} --recipe {args.recipe} --out {out} --resume"
    run_recipe(recipe, out, args.resume, not args.no_progress, args.stop_after, command + " (plus the same options)")
    return 0


def unique_labels(paths: list[tuple[str, ...]]) -> list[str]:
    """A distinct label for each path (given as its parts): its shortest suffix that no other path
    shares, e.g. ``a/model.safetensors`` and ``b/model.safetensors`` for two files named alike; a
    path given more than once gets ``#2``, ``#3``... appended from its second occurrence on."""

    def suffix(parts: tuple[str, ...], k: int) -> str:
        return str(Path(*parts[-k:]))

    labels = []
    for parts in paths:
        others = [other for other in paths if other != parts]  # the same path twice is numbered below
        k = next((k for k in range(1, len(parts) + 1) if all(suffix(parts, k) != suffix(o, k) for o in others)), 0)
        labels.append(suffix(parts, k or len(parts)))
    counts: dict[str, int] = {}
    for i, label in enumerate(labels):
        counts[label] = counts.get(label, 0) + 1
        if counts[label] > 1:
            labels[i] = f"{label}#{counts[label]}"
    return labels


def cli_model_sources(checkpoints: list[str], names: list[str]) -> dict[str, str]:
    """``label -> source`` for ``--checkpoint`` paths (source: the absolute path) then ``--model`` names
    (source: the name), in that order, each label distinct (``unique_labels``)."""
    paths = [os.path.abspath(path) for path in checkpoints]
    labels = unique_labels([Path(path).parts for path in paths] + [(name,) for name in names])
    return dict(zip(labels, paths + names))


def load_cli_models(
    checkpoints: list[str],
    names: list[str],
    shipped_prefix: str = "",
    pretrained: bool | str = True,
    weights: str | None = None,
) -> dict:
    """Models from ``--checkpoint`` paths (run folders or weights files) and ``--model`` names
    (``pretrained``: the shipped weights, or the published ImageNet ones, from ``weights`` when
    given), keyed by a distinct label (``cli_model_sources``); with neither, every shipped model
    whose name starts with ``shipped_prefix``."""
    from ..errors import ConfigError
    from ..weights import create_model, list_pretrained, load_model

    sources = cli_model_sources(checkpoints, names)
    by_name = partial(create_model, pretrained=pretrained, weights=weights)
    loaders = [load_model] * len(checkpoints) + [by_name] * len(names)
    models = {label: load(source) for (label, source), load in zip(sources.items(), loaders)}
    if not models:
        shipped = [n for n in list_pretrained() if n.startswith(shipped_prefix)]
        if not shipped:
            raise ConfigError("no shipped weights in this install; pass --checkpoint RUN_FOLDER from `bcosvit train`")
        models = {name: create_model(name, pretrained=True) for name in shipped}
    headless = [label for label, model in models.items() if model.num_classes == 0]
    if headless:
        raise ConfigError(
            f"{headless[0]} is a headless backbone (num_classes 0: its outputs are features, not classes); "
            "explain, evaluate and serve need a classifier: give it one with `bcosvit align --teacher-features` "
            "or `bcosvit train`"
        )
    return models


def pretrained_from_args(args: argparse.Namespace) -> tuple[list[str], str, str | None]:
    """The ``--model`` names, the ``--pretrained`` weights and the ``--weights`` file of ``explain``
    and ``evaluate``: ``--weights`` implies ``--pretrained imagenet``, and without ``--model`` it
    names the model by the published file's name."""
    from ..errors import ConfigError
    from ..weights import IMAGENET, PUBLISHED, SHIPPED

    names = [args.model] if isinstance(args.model, str) else list(args.model or [])
    if args.weights is None:
        if args.pretrained and not names:
            raise ConfigError("--pretrained chooses the weights of --model NAME; add --model")
        return names, args.pretrained or SHIPPED, None
    if (args.pretrained or IMAGENET) != IMAGENET:
        raise ConfigError("--weights is a published ImageNet .pth file: use it with --pretrained imagenet")
    if not names:
        file_name = Path(args.weights).name
        names = [entry.name for entry in PUBLISHED.values() if entry.file_name == file_name]
        if not names:
            raise ConfigError(f"--weights {args.weights} is not named like a published file; add --model NAME")
    if len(names) > 1:
        raise ConfigError("--weights is the file of one model; pass a single --model NAME")
    return names, IMAGENET, args.weights


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain_files import explain_files

    checkpoints = [args.checkpoint] if args.checkpoint else []
    names, pretrained, weights = pretrained_from_args(args)
    model = next(iter(load_cli_models(checkpoints, names, "bcos_", pretrained, weights).values()))
    source = args.checkpoint or (names[0] if names else "shipped model")
    print(
        f"explaining {len(args.images)} file(s) with {source} "
        f"({model.in_chans}x{model.image_size}x{model.image_size} inputs, {model.num_classes} classes)"
    )
    results, failed = explain_files(
        model, args.images, args.out, target=args.target, topk=args.topk, background=args.background
    )
    folder = os.path.join(os.path.normpath(args.out), "")  # one trailing separator: explanations/, not //
    print(f"\nwrote {len(results)} figure(s) to {folder}" + (f"; {len(failed)} file(s) skipped" if failed else ""))
    return 0 if results and not failed else (1 if results else 2)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    names, pretrained, weights = pretrained_from_args(args)
    models = load_cli_models(args.checkpoint or [], names, pretrained=pretrained, weights=weights)
    for label, model in models.items():
        family = "B-cos" if model.is_bcos else "standard"
        size = f"{model.in_chans}x{model.image_size}x{model.image_size}"
        print(f"model {label}: {family}, {size} inputs, {model.num_classes} classes")
    print(f"serving on http://{args.host}:{args.port} (Ctrl+C ends it)")
    serve(models, port=args.port, host=args.host)
    return 0


def _trained_with(source: str) -> str:
    """The ``--dataset``/``--data-dir`` options the model at ``source`` (checkpoint path or shipped
    name) was trained with, from its metadata; "" when the metadata does not say."""
    from ..weights import weights_metadata
    from .training.config import TrainConfig

    try:
        stored = weights_metadata(source).get("train_config")
        train_config = TrainConfig.from_dict(stored) if stored else None
    except BcosVitError:
        return ""
    if train_config is None:
        return ""
    options = [
        f"--{key.replace('_', '-')} {getattr(train_config, key)}"
        for key in ("dataset", "data_dir")
        if getattr(train_config, key)
    ]
    return " ".join(options)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import EvalConfig, evaluate_dataset

    config = EvalConfig(
        grids=tuple(args.grid_sizes),
        num_grids=args.grids,
        faithfulness_images=args.faithfulness_images,
        ig_steps=args.ig_steps,
        methods=tuple(args.methods),
        seed=args.seed,
        baselines=tuple(args.baselines),
        test_subset=args.test_subset,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        workers=args.workers,
    )
    config.validate()
    names, pretrained, weights = pretrained_from_args(args)
    models = load_cli_models(args.checkpoint or [], names, pretrained=pretrained, weights=weights)
    sources = cli_model_sources(args.checkpoint or [], names)
    evaluate_dataset(models, args.dataset, args.data_dir, args.out, config, sources, trained_with=_trained_with)
    return 0


def check_out_folder(out: Path, force: bool) -> None:
    """Raise ``ConfigError`` when ``out`` is a file, or a folder with files in it and not ``force``."""
    from ..errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"--out {out} is not empty; choose a new folder, or pass --force to replace its model.safetensors "
            "and model.json"
        )


def cmd_convert(args: argparse.Namespace) -> int:
    from ..fileio import ensure_writable_dir
    from ..weights import PUBLISHED, save_weights
    from ..weights.convert import convert_official, match_official, read_official_checkpoint
    from ..weights.hub import conversion_metadata, sha256_of

    out = Path(args.out)
    check_out_folder(out, args.force)
    source = Path(args.checkpoint).absolute()
    state = read_official_checkpoint(source)
    name = match_official(state, args.name, str(source))
    digest = sha256_of(source)
    entry = PUBLISHED.get(name)
    created = not out.exists()
    ensure_writable_dir(out, "output folder (--out)")
    try:
        model = convert_official(state, name)
        path = save_weights(model, out / "model.safetensors", conversion_metadata(name, str(source), digest))
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed conversion leaves no empty folder behind
        raise
    same = entry is not None and digest.startswith(entry.sha256_prefix)
    origin = f"the published {entry.file_name}" if same else f"{name} weights (SHA-256 {digest[:12]}...)"
    print(f"converted {source}: {origin}, {model.num_classes} classes")
    print(f"wrote {path} and {path.with_suffix('.json').name}; use it with --checkpoint {out}")
    return 0


def _add_pretrained_options(p: argparse.ArgumentParser) -> None:
    from ..weights import PRETRAINED_CHOICES

    p.add_argument(
        "--pretrained",
        choices=PRETRAINED_CHOICES,
        help="weights of --model: 'shipped' inside the package (default), or the published 'imagenet' ones "
        "(downloaded once into torch.hub's cache, then loaded from there)",
    )
    p.add_argument(
        "--weights",
        metavar="PATH",
        help="a published ImageNet .pth file you already have (hash checked; implies --pretrained imagenet; "
        "names the model when --model is left out); or set BCOSVIT_WEIGHTS_DIR to a folder of them",
    )


def port_number(text: str) -> int:
    """argparse type: a TCP port in [1, 65535]."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number in [1, 65535], got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port number lies in [1, 65535], got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    from ..weights import PRETRAINED_CHOICES
    from .training.config import TrainConfig

    parser = argparse.ArgumentParser(prog="bcosvit", description="Holistically explainable B-cos Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models with parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'bcos_*_28'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "train",
        help="train a model from a recipe (one process, or many with torchrun)",
        description="Train from a named recipe (--list-recipes) or a recipe file of your own (a copy of one "
        "from bcosvit/app/training/recipes/), with options changed on the command line. A recipe of "
        "several stages runs them in order into sub-folders of --out, each starting from the previous one's "
        "weights where the recipe says so. Distributed: torchrun --nproc_per_node=N -m bcosvit train ...",
        epilog="keys for --set (TrainConfig in bcosvit/app/training/config.py says what each does): "
        + ", ".join(TrainConfig.__dataclass_fields__),
    )
    p.add_argument("--recipe", help="a recipe's name (see --list-recipes) or the path of a recipe .toml file")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    p.add_argument("--out", help="run folder (default: runs/<recipe name, or model without --recipe>)")
    _add_run_options(p)
    group = p.add_argument_group("training options (every stage of the recipe)")
    group.add_argument("--model", help="model name (bcosvit models)")
    group.add_argument(
        "--bcosify-from",
        metavar="RUN_OR_NAME",
        help="B-cosify this trained standard ViT (a run folder, a name with shipped weights such as "
        "vitc_micro_28, or a timm ViT timm:NAME[?KEY=VALUE&...] with timm.create_model arguments) and fine-tune "
        "it: B 1 -> 2 and biases -> 0 over bcosify_warmup_epochs (--set); --model defaults to its B-cos twin "
        "(bcos_timm:NAME for a timm teacher, whose input size the images are resized to)",
    )
    group.add_argument(
        "--finetune-from",
        metavar="NAME_OR_RUN",
        help="fine-tune this trained model (a run folder, a .safetensors file, or a registered name with shipped "
        "or published weights: --pretrained) on --dataset: its architecture and input size (the images are resized "
        "to it, Fashion-MNIST read as RGB for a 3-channel model), a new head for the dataset's classes; --recipe "
        "defaults to finetune (layer decay, warmup: bcosvit train --list-recipes)",
    )
    group.add_argument(
        "--pretrained",
        choices=PRETRAINED_CHOICES,
        help="the weights of --finetune-from NAME: 'shipped' inside the package, or the published 'imagenet' ones "
        "(downloaded once into torch.hub's cache); default: shipped where they ship, else imagenet",
    )
    _add_teacher_weights_option(group)
    group.add_argument(
        "--teacher-features",
        action="store_true",
        help="bcosvit align's (refused here: B-cosification fine-tunes the teacher's logits, which need its head)",
    )
    _add_training_options(group)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "align",
        help="align a B-cos student to a trained ViT without labels, then train its head (ALOE)",
        description="Align Once to Explain (Maser et al., CVPR 2026): the student (the teacher B-cosified "
        "with B = 2 and no biases, or a fresh --student model) learns the frozen teacher's tokens at a third, "
        "two thirds and all of its depth and its pooled features (cosine distance; no labels), then a linear "
        "B-cos head trains on its frozen features. Each stage of the recipe runs into a sub-folder of --out; "
        "the last one is an ordinary run folder (explain, evaluate --checkpoint). Distributed: "
        "torchrun --nproc_per_node=N -m bcosvit align ...",
    )
    p.add_argument(
        "--teacher",
        required=True,
        metavar="RUN_OR_NAME",
        help="a run folder, a name with shipped weights, or a timm ViT timm:NAME[?KEY=VALUE&...] (KEY=VALUE: "
        "timm.create_model arguments, e.g. 'timm:vit_small_patch16_224?img_size=224'); the images are resized to "
        "a timm teacher's input size, Fashion-MNIST's read as RGB",
    )
    _add_teacher_weights_option(p)
    p.add_argument(
        "--teacher-features",
        action="store_true",
        help="the teacher has no head (a timm backbone with num_classes=0: DINO, MAE, SigLIP...) or one for other "
        "classes: align its features only; the B-cosified student gets a fresh head for the dataset's classes, "
        "which the recipe's linear-probe stage trains",
    )
    p.add_argument("--student", help="a registered B-cos model to align from scratch (default: the teacher B-cosified)")
    p.add_argument("--recipe", default="fmnist-align", help="an alignment recipe (default fmnist-align) or .toml file")
    p.add_argument("--out", required=True, help="run folder (one sub-folder per stage)")
    _add_run_options(p)
    _add_training_options(p.add_argument_group("training options (every stage of the recipe)"))
    p.set_defaults(func=cmd_align)
    _add_other_commands(sub)
    return parser


def _add_teacher_weights_option(p) -> None:
    """``--weights FILE``: the weights of a timm teacher (``train --bcosify-from``, ``align --teacher``)."""
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="the weights of the timm teacher (timm:NAME): a .safetensors file or a PyTorch state dict (a "
        "'state_dict' or 'model' entry of a checkpoint is taken), every key matching timm.create_model(NAME, "
        "**KEY=VALUE); the run records its path and SHA-256. Without it, timm's pretrained weights from your "
        "timm / Hugging Face cache (never downloaded). bcosvit train --finetune-from NAME: the published ImageNet "
        ".pth file of NAME you already have (hash checked; implies --pretrained imagenet)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``--resume``, ``--stop-after`` and ``--no-progress``: how a run is carried out."""
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out (finished stages of a recipe are skipped)"
    )
    p.add_argument("--stop-after", type=int, metavar="N", help="end after N epochs of this invocation (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")


def _add_training_options(group) -> None:
    """The training options with a flag of their own (``TRAIN_FLAGS`` but the model) and ``--set``."""
    from .data import DATASETS

    group.add_argument("--dataset", choices=DATASETS)
    group.add_argument("--data-dir", help="dataset location (default for Fashion-MNIST: the Debian package's)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int, help="global batch, split over processes")
    group.add_argument("--lr", type=float, help="peak learning rate")
    group.add_argument("--seed", type=int)
    group.add_argument(
        "--set",
        action="append",
        metavar="[STAGE.]KEY=VALUE",
        help="any training option (keys below), for every stage or for STAGE only; VALUE is read as JSON where "
        'it is JSON: --set warmup_steps=200 --set model_options=\'{"pos_embed": "rope"}\' --set cycle1.epochs=3',
    )


def _add_other_commands(sub) -> None:
    """``explain``, ``evaluate``, ``serve`` and ``convert``."""
    for add in (_add_explain_command, _add_evaluate_command, _add_serve_command, _add_convert_command):
        add(sub)


def _add_explain_command(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="explain image files with a B-cos model (one figure per image)",
        description="Reads PNG/JPEG/... in any colour mode and size, converts them to the model's "
        "input and writes input, colour explanation and contribution map per class. The figure of x.png is "
        "OUT/x.explained.png; a name that is taken gets the next free suffix (x-2.explained.png, ...): names "
        "of earlier images of the same call, the input files, and existing files not written by bcosvit, "
        "which are never replaced (figures of an earlier run are).",
    )
    p.add_argument("images", nargs="+", help="image files")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model", help="name of a model with shipped or published weights (default: the shipped B-cos model)"
    )
    source.add_argument(
        "--checkpoint", help="run folder of `bcosvit train` or `bcosvit convert`, or a .safetensors file"
    )
    _add_pretrained_options(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--target", help="class index or name to explain (default: the top classes)")
    which.add_argument("--topk", type=int, default=2, help="explain the K most likely classes (default 2)")
    p.add_argument("--out", default="explanations", help="output folder (default: explanations/)")
    p.add_argument(
        "--background",
        type=float,
        default=0.0,
        help="grey level in [0, 1] that transparent pixels are composited on (default 0: black, the "
        "background of the shipped Fashion-MNIST models)",
    )
    p.set_defaults(func=cmd_explain)


def _add_evaluate_command(sub) -> None:
    from ..attribution import METHODS
    from .data import DATASETS
    from .evaluation import EvalConfig

    defaults = EvalConfig()  # the flags' defaults
    p = sub.add_parser(
        "evaluate",
        help="accuracy, localisation, faithfulness and completeness, with post-hoc baselines",
        description="Evaluates trained models (default: the shipped ones) and writes metrics.json, "
        "figures and a self-contained report.html. The test set is streamed (memory does not grow "
        "with it). Distributed: torchrun --nproc_per_node=N -m bcosvit evaluate ... (each process "
        "a shard; rank 0 writes).",
    )
    p.add_argument("--checkpoint", nargs="+", help="run folders or .safetensors files")
    p.add_argument("--model", nargs="+", help="names of models with shipped (or, with --pretrained, published) weights")
    _add_pretrained_options(p)
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-dir", help="dataset location (default for Fashion-MNIST: the Debian package's)")
    p.add_argument(
        "--test-subset",
        type=int,
        default=defaults.test_subset,
        help="use N test images drawn stratified by class with --seed (default: all)",
    )
    p.add_argument(
        "--grids",
        type=int,
        default=defaults.num_grids,
        help=f"number of grids per grid size (default {defaults.num_grids})",
    )
    p.add_argument(
        "--grid-sizes",
        type=int,
        nargs="+",
        default=list(defaults.grids),
        help=f"grid sizes (default {' '.join(map(str, defaults.grids))})",
    )
    p.add_argument(
        "--faithfulness-images",
        type=int,
        default=defaults.faithfulness_images,
        help=f"images for deletion/insertion (default {defaults.faithfulness_images})",
    )
    p.add_argument(
        "--ig-steps",
        type=int,
        default=defaults.ig_steps,
        help=f"integrated-gradients steps (default {defaults.ig_steps})",
    )
    p.add_argument("--methods", nargs="+", default=list(defaults.methods), choices=METHODS, help="attribution methods")
    p.add_argument(
        "--baselines",
        nargs="+",
        default=list(defaults.baselines),
        help="deletion/insertion replacement values: zero, mean (of the test images) or numbers "
        f"(default: {' '.join(defaults.baselines)})",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    _add_evaluate_runtime_options(p, defaults)
    p.add_argument("--out", default="evaluation", help="output folder (default: evaluation/)")
    p.set_defaults(func=cmd_evaluate)


def _add_evaluate_runtime_options(p: argparse.ArgumentParser, defaults) -> None:
    """Where ``evaluate`` runs: ``--device``, ``--precision``, ``--workers``, ``--batch-size``."""
    from .evaluation import DEVICES
    from .precision import PRECISIONS

    p.add_argument(
        "--device",
        default=defaults.device,
        choices=DEVICES,
        help="where the models run (default auto: CUDA when there is a device; under torchrun, each "
        "process the GPU of its local rank)",
    )
    p.add_argument(
        "--precision",
        default=defaults.precision,
        choices=PRECISIONS,
        help="of the accuracy pass (default auto: bf16 autocast where bf16 is native); attributions, "
        "curves and completeness always run in fp32",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="DataLoader worker processes reading images (default: the cores, at most 8, shared by the "
        "processes of the machine; 0 for datasets held in memory)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"images per pass through a model (default {defaults.batch_size})",
    )


def _add_serve_command(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page to walk through exact explanations (needs bcosvit[serve])",
        description="Starts a local web app (Gradio): upload, paste or pick an image; the top classes, the exact "
        "explanation of any of them, any unit of any block explained by a click on its token, the evidence block "
        "by block, post-hoc maps of a standard twin beside it, and export (PNG, .npz). Default models: the "
        "shipped ones. Nothing is fetched from outside.",
    )
    p.add_argument("--checkpoint", nargs="+", help="run folders or .safetensors files (B-cos or standard)")
    p.add_argument("--model", nargs="+", help="names of models with shipped (or, with --pretrained, published) weights")
    _add_pretrained_options(p)
    p.add_argument("--port", type=port_number, default=7860, help="port, 1-65535 (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.set_defaults(func=cmd_serve)


def _add_convert_command(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a published B-cos-v2 ViT checkpoint (.pth) into a model folder",
        description="Reads a checkpoint of the reference implementation (the published B-cos-v2 ViTs or the "
        "same architectures trained with it; loaded without pickle), finds the matching bcosvit model and writes "
        "OUT/model.safetensors and OUT/model.json, which --checkpoint OUT accepts in explain and evaluate.",
    )
    p.add_argument("checkpoint", help="the .pth file")
    p.add_argument("--out", required=True, help="output folder (new or empty, unless --force)")
    p.add_argument("--name", help="the bcosvit model name (default: found from the tensor shapes)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its model files")
    p.set_defaults(func=cmd_convert)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BcosVitError as exc:
        print(f"bcosvit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bcosvit {args.command}: interrupted", file=sys.stderr)
        return 130


def run() -> int:
    """The ``bcosvit`` command (console script and ``python -m bcosvit``): ``main`` with the
    command line's memory policy (``allocator.keep_freed_memory``)."""
    keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(run())
