"""Training runs: recipes, run folder contents, exact resume, DDP equivalence, recipe pieces, clear errors."""

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bcosvit import ConfigError, create_model
from bcosvit.app.cli import build_parser, train_run_from_args
from bcosvit.app.training import TrainConfig, list_recipes, load_recipe, train
from bcosvit.app.training.builders import build_optimizer, lr_scale_of
from bcosvit.app.training.clipping import adaptive_clip_grad_
from bcosvit.app.training.losses import bce_uniform_off_labels, energy_loss
from bcosvit.app.training.mosaics import mosaic, mosaic_targets
from bcosvit.app.training.recipes import build_recipe, parse_settings
from bcosvit.app.training.runner import run_recipe
from bcosvit.app.training.schedules import warmup_cosine
from bcosvit.app.training.step import Trainer
from bcosvit.errors import CheckpointError
from bcosvit.weights.checkpoint import load_model

SUBSET = str(Path(__file__).parent / "data" / "fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> TrainConfig:
    """A few steps of the nano B-cos model on the committed Fashion-MNIST subset."""
    base = dict(
        model="bcos_vit_nano_patch4_28",
        data_dir=SUBSET,
        train_subset=256,
        test_subset=128,
        epochs=2,
        batch_size=64,
        warmup_steps=2,
        explain_examples=False,
    )
    return TrainConfig(**{**base, **overrides})


def leave_stale_temporaries(folder: Path) -> list[Path]:
    """What a run killed while saving leaves: atomic_write's temporary files (and a user's own files)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (".model.safetensors.k2x_9q1z.tmp", ".state.pt.abcdefgh.tmp", "notes.tmp", ".notes.tmp"):
        (folder / name).write_bytes(b"partial")
    return [folder / "notes.tmp", folder / ".notes.tmp"]


def test_run_folder_holds_weights_metadata_metrics_and_plot(tmp_path):
    users_files = leave_stale_temporaries(tmp_path)
    metrics = train(tiny_config(), tmp_path, progress=False)
    assert {"config.json", "model.safetensors", "model.json", "state.pt", "metrics.jsonl", "curves.png"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert sorted(p for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted(users_files)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["model_name"] == "bcos_vit_nano_patch4_28" and meta["epoch"] == 2
    assert meta["classes"][9] == "Ankle boot" and meta["train_config"]["batch_size"] == 64
    # "auto" resolved once, when the run started: what the run did, readable in its folder
    stored = json.loads((tmp_path / "config.json").read_text())
    resolved = {"optimizer": "adam", "loss": "bce", "clip": "agc", "clip_value": 0.01}
    assert {key: stored[key] for key in resolved} == resolved and stored["precision"] in ("fp32", "bf16")
    assert meta["train_config"] == stored and meta["precision"] == stored["precision"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert 0 <= metrics["test_top1"] <= 100 and metrics["test_top5"] >= metrics["test_top1"]
    model = load_model(tmp_path)
    assert model.is_bcos and model.config.class_names[0] == "T-shirt/top"


def test_explanation_figure_of_a_run_shows_class_names_with_dollar_signs_literally(tmp_path):
    from PIL import Image

    from bcosvit.app.training.runner import write_explanation_figure
    from bcosvit.weights.checkpoint import save_weights

    classes = ["a$x^2$", r"b$\foo$"]  # folder names that matplotlib would read as (broken) mathtext
    for k, name in enumerate(classes):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (12, 12), (200 * k, 90, 30)).save(tmp_path / "data" / "val" / name / "x.png")
    model = create_model("bcos_vit_nano_patch4_28", in_chans=3, num_classes=2, image_size=8, depth=1)
    save_weights(model, tmp_path / "run" / "model.safetensors", {"model_name": "bcos_vit_nano_patch4_28"})
    config = TrainConfig(dataset="folder", data_dir=str(tmp_path / "data"), image_size=8)
    figure = write_explanation_figure(tmp_path / "run", config)  # raised ValueError from mathtext
    assert figure == tmp_path / "run" / "explanations.png" and figure.is_file()


def straight_and_resumed(config, folder: Path) -> tuple[dict, dict]:
    """The saved weights of a run of ``config`` straight through and of one stopped after its first
    epoch and resumed (``folder/straight``, ``folder/resumed``)."""
    train(config, folder / "straight", progress=False)
    train(config, folder / "resumed", progress=False, stop_after=1)
    train(config, folder / "resumed", progress=False, resume=True)
    straight, resumed = (load_file(str(folder / name / "model.safetensors")) for name in ("straight", "resumed"))
    return straight, resumed


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    config = tiny_config(epochs=3, randaugment=3)
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=1)
    assert json.loads((tmp_path / "resumed" / "model.json").read_text())["epoch"] == 1
    users_files = leave_stale_temporaries(tmp_path / "resumed")
    train(config, tmp_path / "resumed", progress=False, resume=True)
    assert sorted(p for p in (tmp_path / "resumed").iterdir() if p.name.endswith(".tmp")) == sorted(users_files)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)


def test_resume_refuses_different_settings_and_new_runs_refuse_existing_folders(tmp_path):
    train(tiny_config(epochs=1), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="different settings for \\['lr'\\]"):
        train(tiny_config(epochs=2, lr=0.5), tmp_path, resume=True, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(epochs=1), tmp_path, progress=False)


class _WritesAMarker:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_resume_refuses_a_state_file_that_would_run_code_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"epoch": 1, "payload": _WritesAMarker(marker)}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt is corrupt or holds more than tensors"):
        train(tiny_config(), tmp_path, resume=True, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"epoch": "1"}, "'epoch' must be of type int"),
        ({"optimizer": None}, "'optimizer' must be of type dict"),
        ({"config": {**tiny_config().to_dict(), "lr": "0.001"}}, "'lr' must be of type float"),
        ({"config": {**tiny_config().to_dict(), "flip": 1}}, "'flip' must be of type bool"),
    ],
    ids=["epoch text", "no optimizer", "lr text", "flip number"],
)
def test_resume_refuses_a_state_file_with_wrong_types_naming_the_entry(tmp_path, change, field):
    state = {"epoch": 1, "config": tiny_config().to_dict(), "history": [], "model": {}, "optimizer": {}, "ema": None}
    torch.save({**state, **change}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=field):
        train(tiny_config(), tmp_path, resume=True, progress=False)


@pytest.mark.slow
def test_standard_twin_trains_with_ema_mixup_and_bf16(tmp_path):
    metrics = train(
        tiny_config(model="vit_nano_patch4_28", epochs=1, ema=0.9, mixup=0.2, precision="bf16"),
        tmp_path,
        progress=False,
    )
    assert metrics["epoch"] == 1 and json.loads((tmp_path / "model.json").read_text())["ema"] is True
    model = load_model(tmp_path)
    assert not model.is_bcos
    assert model.config.input_mean == pytest.approx([0.286])  # the dataset's statistics


@pytest.mark.slow
def test_bcos_training_learns_well_above_chance(tmp_path):
    metrics = train(
        tiny_config(epochs=5, train_subset=1000, test_subset=500, warmup_steps=20), tmp_path, progress=False
    )
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["test_top1"] > 30  # chance is 10%; about 45% after these 75 steps


# torchrun's gloo rendezvous is exercised on Linux (CI); elsewhere these tests are skipped
needs_torchrun = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def settings(*items: str) -> list[str]:
    """``--set ITEM`` for each item."""
    return [arg for item in items for arg in ("--set", item)]


def torchrun_two(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` on CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.ddp
@needs_torchrun
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    common = ["--model", "bcos_vit_nano_patch4_28", "--data-dir", SUBSET, "--epochs", "1", "--batch-size", "64"]
    # 63 test images: shards of 32 and 31, which validate the whole set once between them
    common += ["--no-progress", *settings("train_subset=256", "test_subset=63", "warmup_steps=2", "flip=false")]
    # fp32 on every machine: "auto" picks bf16 where the CPU has it, and bf16 rounds a batch split
    # over two processes differently from the whole batch, far beyond this comparison's tolerance
    common += settings("crop_padding=0", "explain_examples=false", "precision=fp32")
    single = subprocess.run(
        [sys.executable, "-m", "bcosvit", "train", *common, "--out", str(tmp_path / "one")],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    ddp = torchrun_two("-m", "bcosvit", "train", *common, "--out", str(tmp_path / "two"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 process(es)" in ddp.stdout
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    initial = create_model("bcos_vit_nano_patch4_28").state_dict()
    moved = max(float((a[k] - initial[k]).abs().max()) for k in a if k in initial and a[k].shape == initial[k].shape)
    assert moved > 1e-4  # the weights did change during the 4 steps
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    one, two = (json.loads((tmp_path / name / "metrics.jsonl").read_text()) for name in ("one", "two"))
    assert (two["test_top1"], two["test_top5"]) == (one["test_top1"], one["test_top5"])
    assert 0 < one["test_top5"] and round(one["test_top1"] * 63 / 100, 6).is_integer()  # of all 63 images
    # the losses of the whole test set and of all processes' training batches
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)


@pytest.mark.ddp
@needs_torchrun
def test_energy_loss_under_ddp_leaves_the_processes_with_identical_weights(tmp_path):
    # Two forward passes through DDP (classification, then the explanation of the energy loss) and one
    # backward: DDP all-reduces both losses' gradients, so the processes end with identical weights
    # (without DDP they would differ in every tensor). Every process saves the weights of the model it
    # trained (found by a global forward hook).
    script = tmp_path / "energy_ddp.py"
    script.write_text(
        "import os, sys, torch\n"
        "from bcosvit import VisionTransformer\n"
        "from bcosvit.app.cli import main\n"
        "models = set()\n"
        "torch.nn.modules.module.register_module_forward_hook(\n"
        "    lambda module, args, output: models.add(module) if isinstance(module, VisionTransformer) else None\n"
        ")\n"
        "code = main(sys.argv[1:])\n"
        "(model,) = models\n"
        f"torch.save(model.state_dict(), f'{tmp_path}/rank{{os.environ[\"RANK\"]}}.pt')\n"
        "sys.exit(code)\n"
    )
    ddp = torchrun_two(
        str(script), "train", "--model", "bcos_vit_nano_patch4_28", "--data-dir", SUBSET,
        "--epochs", "1", "--batch-size", "32", "--lr", "1e-2", "--no-progress", "--out", str(tmp_path / "ddp"),
        *settings("train_subset=128", "test_subset=32", "mosaic=1", "mosaic_grid=2", "energy_loss=10"),
        *settings("warmup_steps=0", "explain_examples=false"),
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 process(es)" in ddp.stdout and "energy loss" in ddp.stdout
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    initial = create_model("bcos_vit_nano_patch4_28").state_dict()
    assert max(float((first[k] - initial[k]).abs().max()) for k in initial) > 1e-4  # the weights moved
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


def test_mosaic_tiles_consecutive_images_row_major_and_sums_their_targets():
    images = torch.arange(9.0).reshape(9, 1, 1, 1).expand(9, 1, 2, 2).clone()
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2, 3, 3, 3, 3, 1]), 4).float()
    canvases, summed = mosaic(images, targets, grid=2)
    assert canvases.shape == (2, 1, 4, 4)  # the ninth image is dropped
    assert canvases[0, 0, :2, :2].eq(0).all() and canvases[0, 0, :2, 2:].eq(1).all()
    assert canvases[0, 0, 2:, :2].eq(2).all() and canvases[1, 0, 2:, 2:].eq(7).all()
    torch.testing.assert_close(summed, torch.tensor([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))
    torch.testing.assert_close(mosaic_targets(summed, 4, "bce"), torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 1]]))
    torch.testing.assert_close(mosaic_targets(summed, 4, "ce"), torch.tensor([[0.25, 0.25, 0.5, 0], [0, 0, 0, 1]]))
    with pytest.raises(ValueError, match="at least 9 images"):
        mosaic(images[:8], targets[:8], grid=3)


@pytest.mark.slow
def test_mosaic_training_resumes_exactly_and_init_from_starts_from_given_weights(tmp_path):
    config = tiny_config(epochs=2, mosaic=0.5, mosaic_grid=3)
    a, b = straight_and_resumed(config, tmp_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)
    # stage 2 from the stage-1 weights: with lr ~ 0 the weights stay those of the first run
    tuned = train(
        tiny_config(epochs=1, lr=1e-12, init_from=str(tmp_path / "straight")), tmp_path / "ft", progress=False
    )
    c = load_file(str(tmp_path / "ft" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=0, atol=1e-6, msg=key)
    assert tuned["test_top1"] >= 0
    with pytest.raises(ConfigError, match="3x3 mosaic needs at least 9 images per process"):
        train(tiny_config(batch_size=8, mosaic=1.0, mosaic_grid=3), tmp_path / "small", progress=False)
    canvases = dict(batch_size=8, energy_canvases=4, mosaic_grid=3, epochs=1, train_subset=16, test_subset=16)
    with pytest.raises(ConfigError, match="3x3 mosaic needs at least 9 images per process"):
        train(tiny_config(energy_loss=0.5, **canvases), tmp_path / "small-energy", progress=False)
    # without the energy loss no canvas is built, so a small batch is fine
    assert train(tiny_config(energy_loss=0.0, **canvases), tmp_path / "no-energy", progress=False)["test_top1"] >= 0
    with pytest.raises(CheckpointError):
        train(tiny_config(init_from=str(tmp_path / "missing")), tmp_path / "bad", progress=False)
    with pytest.raises(CheckpointError):
        train(
            tiny_config(model="bcos_vit_micro_patch4_28", init_from=str(tmp_path / "straight")),
            tmp_path / "bad2",
            progress=False,
        )


def test_energy_loss_is_the_share_of_positive_attribution_outside_the_class_cells():
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 3.0  # all positive evidence in cell 0
    maps[0, 2:, 2:] = -5.0  # negative evidence elsewhere costs nothing
    maps[1, :2, :2], maps[1, :2, 2:], maps[1, 2:, :2] = 1.0, 1.0, 2.0  # a quarter in cell 0, a quarter in 1
    inside = torch.tensor([[True, False, False, False], [True, True, False, False]])
    torch.testing.assert_close(energy_loss(maps, inside, grid=2), torch.tensor((0.0 + 0.5) / 2))
    maps.requires_grad_(True)
    energy_loss(maps, inside, grid=2).backward()
    assert maps.grad[1, 2:, :2].gt(0).all() and maps.grad[1, :2, :2].lt(0).all()  # pushes evidence into the cell


@pytest.mark.slow
@pytest.mark.parametrize(
    "canvases",
    [{"mosaic": 1.0, "mosaic_grid": 2}, {"energy_canvases": 4, "mosaic_grid": 3}],
    ids=["mosaic batches", "canvases beside single-image batches"],
)
def test_energy_loss_trains_through_the_exact_explanation_of_mosaic_cells(tmp_path, canvases):
    config = tiny_config(epochs=1, lr=1e-2, warmup_steps=0, **canvases)
    guided = train(dataclasses.replace(config, energy_loss=10.0), tmp_path / "guided", progress=False)
    # a negligible weight draws the same random cells and augmentations: only the energy term's
    # gradient can tell the two runs apart
    control = train(dataclasses.replace(config, energy_loss=1e-9), tmp_path / "control", progress=False)
    assert 0 < guided["train_energy_loss"] < 1 and 0 < control["train_energy_loss"] < 1
    a = load_file(str(tmp_path / "guided" / "model.safetensors"))
    b = load_file(str(tmp_path / "control" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4
    assert "train_energy_loss" not in train(config, tmp_path / "plain", progress=False)


def test_energy_canvases_are_tiled_from_the_batch_with_their_cell_classes():
    images = torch.arange(20.0).reshape(20, 1, 1, 1).expand(20, 1, 2, 2)
    targets = torch.nn.functional.one_hot(torch.arange(20) % 10, 10).float()
    trainer = types.SimpleNamespace(config=TrainConfig(energy_canvases=3, mosaic_grid=2))
    canvases, cells, grid = Trainer.energy_canvases(trainer, images, targets)
    assert grid == 2 and canvases.shape == (3, 1, 4, 4)  # capped at energy_canvases
    assert cells.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert canvases[2, 0, 2, 0] == 10.0  # third canvas, bottom-left cell: image 10 (row-major)
    trainer.config = TrainConfig(energy_canvases=8, mosaic_grid=2)
    assert len(Trainer.energy_canvases(trainer, images, targets)[0]) == 5  # capped at what the batch holds


def test_bce_clamps_off_labels_to_one_over_c():
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.25, 0.25, 0.25]]))
    torch.testing.assert_close(bce_uniform_off_labels(logits, targets), expected)


def test_adaptive_clipping_bounds_each_unit_relative_to_its_weight():
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # unit norms 5 and 0 (-> eps)
    p.grad = torch.tensor([[30.0, 40.0], [1.0, 0.0]])
    adaptive_clip_grad_([p], clip=0.01, eps=1e-3)
    torch.testing.assert_close(p.grad[0].norm(), torch.tensor(0.05))
    torch.testing.assert_close(p.grad[1].norm(), torch.tensor(1e-5))
    small = torch.nn.Parameter(torch.ones(2, 2))
    small.grad = torch.full((2, 2), 1e-4)
    adaptive_clip_grad_([small])
    torch.testing.assert_close(small.grad, torch.full((2, 2), 1e-4))  # under the bound: untouched


def test_schedule_warms_up_linearly_then_decays_to_the_minimum():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)


def test_lr_scales_set_the_rate_of_each_parameter_by_its_longest_prefix(tmp_path):
    model = create_model("bcos_vit_nano_patch4_28", num_classes=10)
    scales = {"blocks": 0.5, "blocks.1": 0.25}
    optimizer = build_optimizer(model, tiny_config(lr_scales=scales).resolved())
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        expected = 0.25 if name.startswith("blocks.1.") else 0.5 if name.startswith("blocks.") else 1.0
        assert scale_of[id(param)] == lr_scale_of(name, scales) == expected, name
    assert lr_scale_of("blocks.10.mlp.fc1.weight", scales) == 0.5  # "blocks.1" ends at a dot
    assert len(build_optimizer(model, tiny_config().resolved()).param_groups) == 2  # as before the option
    with pytest.raises(ConfigError, match="'block' names no trainable parameter"):
        build_optimizer(model, tiny_config(lr_scales={"block": 0.5}).resolved())

    config = tiny_config(train_subset=64, batch_size=32, epochs=1, warmup_steps=0, lr_scales={"head": 0.1})
    train(config, tmp_path / "run", progress=False)  # the step scales each group's scheduled rate
    groups = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    last = config.lr * warmup_cosine(1, 0, 2)  # the rate of the second (last) step
    assert sorted(g["lr_scale"] for g in groups) == [0.1, 0.1, 1.0, 1.0]
    assert all(g["lr"] == pytest.approx(g["lr_scale"] * last) for g in groups)


def test_imagenet_recipe_resolves_the_published_choices_per_family_and_warms_big_models_up_longer():
    bcos = load_recipe("imagenet", {"model": "bcos_vit_tiny_patch16_224"}).stages[0].config.resolved()
    assert (bcos.optimizer, bcos.loss, bcos.clip, bcos.clip_value) == ("adam", "bce", "agc", 0.01)
    assert (bcos.batch_size, bcos.epochs, bcos.randaugment, bcos.mixup) == (1024, 90, 10, 0.2)
    assert (bcos.weight_decay, bcos.warmup_steps) == (0.0, 10_000)
    standard = load_recipe("imagenet", {"model": "vit_base_patch16_224"}).stages[0].config.resolved()
    assert (standard.optimizer, standard.loss, standard.clip, standard.clip_value) == ("adamw", "ce", "norm", 1.0)
    assert standard.weight_decay == 1e-4 and standard.warmup_steps == 50_000
    assert load_recipe("imagenet", {"model": "bcos_vitc_large_224"}).stages[0].config.warmup_steps == 50_000
    assert load_recipe("fmnist", {"model": "vitc_micro_28"}).stages[0].config.weight_decay == 0.05
    assert load_recipe("fmnist", {"model": "bcos_vitc_micro_28"}).stages[0].config.weight_decay == 0.0


# fmnist-demo of d6e33da (the preset of the main job), every field
DEMO_PRESET = {
    "model": "bcos_vitc_micro_28", "model_options": {"pos_embed": "rope"}, "dataset": "fashion-mnist",
    "data_dir": None, "image_size": None, "train_subset": None, "test_subset": None, "epochs": 2,
    "batch_size": 64, "lr": 1e-3, "lr_scales": {}, "weight_decay": 0.0, "optimizer": "auto", "loss": "auto",
    "clip": "auto", "clip_value": None, "agc_eps": 1e-3, "warmup_steps": 300, "min_lr": 0.0, "randaugment": 0,
    "flip": True, "crop_padding": None, "mixup": 0.0, "mosaic": 0.0, "mosaic_grid": 2, "energy_loss": 0.0,
    "energy_canvases": 0, "init_from": None, "finetune_from": None, "finetune_pretrained": "auto",
    "finetune_weights": None, "finetune_new_head": None, "layer_decay": None, "bcosify_from": None,
    "bcosify_warmup_epochs": 1.0, "bcosify_bias_epochs": None, "bcosify_norm_bias_epochs": None, "align_to": None,
    "train_head_only": False, "label_smoothing": 0.0, "ema": 0.0, "precision": "auto", "compile": True,
    "grad_checkpointing": False, "log_every": 50, "eval_every": 1, "seed": 0,  # the three: options added since
    "num_workers": 0, "explain_examples": True,
}  # fmt: skip


def test_main_job_recipe_is_the_old_fmnist_demo_preset():
    recipe = load_recipe("fmnist-demo")
    assert [stage.name for stage in recipe.stages] == [""]  # one run, straight into --out
    assert recipe.stages[0].config.to_dict() == DEMO_PRESET
    assert recipe.runs("runs/demo") == [(Path("runs/demo"), TrainConfig(**DEMO_PRESET))]


# The shipped pair's four cycles as docs/results.md gave them at d6e33da: each
#   bcosvit train --preset fmnist-<model> --model-options ... --init-from <previous cycle's run> <options>
# with the preset fmnist-<model> = FMNIST_PRESET (+ weight decay 0.05 for the standard twin).
FMNIST_PRESET = dict(dataset="fashion-mnist", epochs=20, batch_size=128, lr=1e-3, warmup_steps=1000, compile=True)
ROPE, DIST1 = {"pos_embed": "rope"}, {"pos_embed": "rope", "attn_distance_penalty": 1.0}
EMA_CYCLE = dict(epochs=15, lr=5e-4, warmup_steps=500, ema=0.999, seed=1)
SHIPPED_CYCLES = {
    "bcos_vitc_micro_28": [
        dict(model_options=ROPE, epochs=30),
        dict(model_options=ROPE, **EMA_CYCLE),
        dict(model_options=DIST1, **EMA_CYCLE),
        dict(model_options=DIST1, energy_loss=0.3, energy_canvases=16, mosaic_grid=3, epochs=6, lr=2e-4,
             warmup_steps=300, ema=0.999, seed=2),
    ],
    "vitc_micro_28": [
        dict(model_options=ROPE, epochs=30, weight_decay=0.05),
        dict(model_options=ROPE, **EMA_CYCLE, weight_decay=0.05),
        dict(model_options=DIST1, **EMA_CYCLE, weight_decay=0.05),
        dict(model_options=DIST1, epochs=8, lr=3e-4, warmup_steps=300, ema=0.999, seed=2, weight_decay=0.05),
    ],
}  # fmt: skip


@pytest.mark.parametrize("model", SHIPPED_CYCLES)
def test_the_command_in_the_results_runs_the_shipped_four_cycles_each_from_the_previous_one(model):
    # the command that docs/results.md gives for the shipped model, as the CLI reads it
    lines = (REPO / "docs" / "results.md").read_text().splitlines()
    (line,) = [line for line in lines if f"bcosvit train --recipe fmnist-{model} --out" in line]
    words = shlex.split(line.partition("bcosvit")[2].partition("#")[0])
    recipe, out = train_run_from_args(build_parser().parse_args(words))
    folders = [out / f"cycle{i}" for i in range(1, 5)]
    expected = [
        TrainConfig(model=model, **{**FMNIST_PRESET, **cycle}, init_from=str(folders[i - 1]) if i else None)
        for i, cycle in enumerate(SHIPPED_CYCLES[model])
    ]
    assert recipe.runs(out) == list(zip(folders, expected))
    assert out == Path(f"runs/fmnist-{model}")  # where `make ship` takes cycle4 from


def test_every_packaged_recipe_parses_and_says_what_it_is_for():
    recipes = list_recipes()
    assert {"fmnist-demo", "fmnist", "fmnist-mosaic", "cifar10", "imagenet"} <= set(recipes)
    assert {"fmnist-bcos_vitc_micro_28", "fmnist-vitc_micro_28"} <= set(recipes)
    for name, description in recipes.items():
        assert 20 < len(description) < 160 and "\n" not in description, name
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.stages
        two = load_recipe(name, {"model": "vit_micro_patch4_32"} if name == "cifar10" else {"epochs": 1})
        assert all(stage.config.validate() is None for stage in two.stages)


def write_recipe(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


TWO_STAGES = """
description = "a tiny two-stage recipe"
[train]
model = "bcos_vit_nano_patch4_28"
train_subset = 128
test_subset = 64
epochs = 1
batch_size = 64
warmup_steps = 2
explain_examples = false
[stages.first]
[stages.second]
init_from_stage = "first"
lr = 5e-4
"""


def two_stages_with(old: str, new: str) -> str:
    return TWO_STAGES.replace(old, new)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (two_stages_with("lr = 5e-4", "lrr = 5e-4"), r"two.toml, stage second: unknown training option\(s\) \['lrr'\]"),
        (two_stages_with("lr = 5e-4", "lr = 'fast'"), r"two.toml, stage second: .*'lr' must be of type float"),
        (two_stages_with("lr = 5e-4", "lr = -1.0"), r"two.toml, stage second: lr must be positive, got -1.0"),
        (two_stages_with("epochs = 1", "epoch = 1"), r"two.toml, \[train\]: unknown training option\(s\) \['epoch'\]"),
        (two_stages_with('"first"', '"third"'), r"stage second: init_from_stage 'third' is no earlier stage"),
        (TWO_STAGES + "[stages.third]\ninit_from_stage = 'third'\n", r"earlier: \['first', 'second'\]"),
        ("[trian]\nepochs = 1\n", r"two.toml: unknown key\(s\) \['trian'\]"),
        ("[standard]\nmodel = 'vit_nano_patch4_28'\n", r"two.toml, \[standard\]: may not set model"),
        ("[train]\nmodel = 'vit_huge'\n", r"two.toml: unknown model name"),
        ("[train\nepochs = 1\n", r"two.toml: not a valid TOML file"),
    ],
    ids=["unknown key", "wrong type", "out of range", "unknown key in train", "unknown stage", "later stage",
         "unknown table", "family table sets model", "unknown model", "not TOML"],
)  # fmt: skip
def test_a_bad_recipe_file_is_refused_naming_file_stage_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(write_recipe(tmp_path / "two.toml", text))


def test_set_options_apply_to_every_stage_or_one_and_are_checked_like_the_file(tmp_path):
    path = write_recipe(tmp_path / "two.toml", TWO_STAGES)
    settings, stage_settings = parse_settings(["epochs=3", "second.lr=1e-2", "data_dir=/x/y", "flip=false"])
    assert settings == {"epochs": 3, "data_dir": "/x/y", "flip": False} and stage_settings == {"second": {"lr": 1e-2}}
    first, second = load_recipe(path, settings, stage_settings).stages
    assert (first.config.epochs, first.config.lr, first.config.data_dir) == (3, 1e-3, "/x/y")
    assert (second.config.epochs, second.config.lr, second.init_from_stage) == (3, 1e-2, "first")
    with pytest.raises(ConfigError, match=r"the command line: unknown training option\(s\) \['epohcs'\]"):
        load_recipe(path, *parse_settings(["epohcs=3"]))
    with pytest.raises(ConfigError, match=r"--set third.KEY: recipe .*two.toml has no stage 'third'"):
        load_recipe(path, *parse_settings(["third.epochs=3"]))
    with pytest.raises(ConfigError, match=r"stage second: starts from stage first .*\(--set first.init_from="):
        load_recipe(path, *parse_settings(["init_from=runs/a"]))
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_settings(["epochs"])
    assert build_recipe("", {}, settings={"epochs": 4}).runs("runs/x") == [(Path("runs/x"), TrainConfig(epochs=4))]


def test_a_two_stage_recipe_runs_in_order_and_resumes_skipping_the_finished_stage(tmp_path, capsys):
    recipe = load_recipe(write_recipe(tmp_path / "two.toml", TWO_STAGES), {"data_dir": SUBSET})
    out = tmp_path / "run"
    run_recipe(recipe, out, progress=False, stop_after=1)  # ends after the first stage's epoch
    assert (out / "first" / "model.safetensors").is_file() and not (out / "second").exists()
    assert "Continue with: bcosvit train --out" in capsys.readouterr().out
    first_state = (out / "first" / "state.pt").read_bytes()
    metrics = run_recipe(recipe, out, resume=True, progress=False)
    printed = capsys.readouterr().out
    assert f"stage first: finished (1 epochs in {out / 'first'}), skipped" in printed and metrics["epoch"] == 1
    assert (out / "first" / "state.pt").read_bytes() == first_state  # not trained again
    second = json.loads((out / "second" / "config.json").read_text())
    assert second["init_from"] == str(out / "first") and second["lr"] == 5e-4
    # the second stage started from the first one's weights: with lr ~ 0 they stay the same
    still = load_recipe(str(tmp_path / "two.toml"), {"data_dir": SUBSET}, {"second": {"lr": 1e-12}})
    run_recipe(still, tmp_path / "still", progress=False)
    a = load_file(str(tmp_path / "still" / "first" / "model.safetensors"))
    b = load_file(str(tmp_path / "still" / "second" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    run_recipe(recipe, out, resume=True, progress=False)
    assert capsys.readouterr().out.count("finished (1 epochs") == 2
    with pytest.raises(ConfigError, match=r"different settings for \['lr'\]"):  # a changed recipe is not skipped
        run_recipe(load_recipe(str(tmp_path / "two.toml"), {"data_dir": SUBSET, "lr": 0.5}), out, resume=True)


def test_a_run_that_stored_auto_settings_resumes_with_the_resolved_ones(tmp_path):
    # runs before the recipes stored the config as given ("auto"); they must still resume
    config = tiny_config(epochs=2)
    train(config, tmp_path, progress=False, stop_after=1)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["config"]["optimizer"] == "adam"
    state["config"].update(optimizer="auto", loss="auto", clip="auto", clip_value=None, precision="auto")
    torch.save(state, tmp_path / "state.pt")
    assert train(config, tmp_path, resume=True, progress=False)["epoch"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"optimizer": "rmsprop"}, "optimizer must be"),
        ({"precision": "fp8"}, "precision must be auto, fp32 or bf16"),
        ({"model": "bcos_vit_huge"}, "unknown model name"),
        ({"model_options": {"pos_embed": "spiral"}}, "pos_embed must be one of"),
        ({"model_options": {"num_classes": 3}}, "model_options may not set num_classes"),
        ({"mosaic": 1.5}, "mosaic probability must lie in"),
        ({"mosaic_grid": 1}, "mosaic_grid must be >= 2"),
        ({"mosaic": 0.5, "energy_loss": -1.0}, "energy_loss must be >= 0"),
        ({"energy_loss": 1.0}, "energy_loss acts on mosaic canvases only"),
        ({"energy_canvases": -1}, "energy_canvases must be >= 0"),
        ({"model": "vit_nano_patch4_28", "mosaic": 0.5, "energy_loss": 1.0}, "vit_nano_patch4_28 is a standard model"),
        ({"test_subset": -1}, r"test_subset must be >= 1"),
        ({"test_subset": 0}, r"test_subset must be >= 1"),
        ({"train_subset": 0}, r"train_subset must be >= 1"),
        ({"lr": float("inf")}, "lr must be a finite number, got inf"),
        ({"lr": float("nan")}, "lr must be a finite number, got nan"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
        ({"clip_value": float("inf")}, "clip_value must be a finite number"),
        ({"mixup": float("inf")}, "mixup must be a finite number"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"min_lr": -1e-4}, r"min_lr must lie in \[0, lr"),
        ({"min_lr": 1.0}, r"min_lr must lie in \[0, lr"),
        ({"agc_eps": 0.0}, "agc_eps must be positive"),
        ({"clip_value": 0.0}, "clip_value must be positive"),
        ({"image_size": 0}, "image_size must be >= 1"),
        ({"seed": -1}, r"seed must lie in \[0, 2\*\*32\)"),
        ({"seed": 2**64}, r"seed must lie in \[0, 2\*\*32\)"),
        ({"log_every": 0}, "log_every must be >= 1 step"),
        ({"eval_every": 0}, "eval_every must be >= 1 epoch"),
        ({"lr_scales": {"blocks": 0.0}}, "lr_scales factors must be positive numbers"),
        ({"lr_scales": {"blocks": True}}, "lr_scales factors must be positive numbers"),
        ({"lr_scales": {"": 0.5}}, r"lr_scales keys must be parameter-name prefixes"),
        ({"grad_checkpointing": True, "energy_canvases": 2, "energy_loss": 1.0}, "set energy_loss = 0 or grad_"),
    ],
)
def test_bad_training_values_are_rejected_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides).validate()


def fail_if_data_is_read(*args, **kwargs):
    """A ``dataset_loader`` for ``train`` that no check may let a run reach."""
    raise AssertionError("training started its work despite an invalid setting")


@pytest.mark.parametrize("where", ["existing file", "under /proc", "parent is a file"])
def test_train_refuses_an_unwritable_run_folder_before_any_work(tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    out = {
        "existing file": tmp_path / "file",
        "under /proc": Path("/proc/bcosvit-out"),
        "parent is a file": tmp_path / "file" / "run",
    }[where]
    with pytest.raises(ConfigError, match=f"run folder \\(--out\\) {out}"):
        train(tiny_config(), out, progress=False, dataset_loader=fail_if_data_is_read)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_stop_after_zero_epochs_is_rejected_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--stop-after must be >= 1"):
        train(tiny_config(), tmp_path / "run", progress=False, stop_after=0, dataset_loader=fail_if_data_is_read)
    assert not (tmp_path / "run").exists()
