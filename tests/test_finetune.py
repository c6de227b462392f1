"""Fine-tuning trained weights (``finetune_from``, issue 28 item 6): a run folder, a weights file or a
registered name (shipped, or published through a ``file://`` URL: nothing downloads) becomes the model
of a run, its architecture and input size the source's, its head new for the dataset's classes (the
B-cos logit bias for the new count); a frozen backbone stays the source's, layer-wise lr decay sets
each parameter group's rate, BCE and CE both learn from the first step, ``--resume`` continues exactly,
and wrong settings are clear ``ConfigError``s."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bcosvit.app.cli import build_parser, main, train_run_from_args
from bcosvit.app.data import DataSpec, load_dataset
from bcosvit.app.training import load_recipe, train
from bcosvit.app.training.builders import build_optimizer, finetune_model, layer_decay_scales, run_dataset_loader
from bcosvit.app.training.distributed import Runtime
from bcosvit.app.training.schedules import warmup_cosine
from bcosvit.app.training.step import Trainer
from bcosvit.errors import ConfigError
from bcosvit.weights import create_model, load_model, save_weights
from tests.test_train import SUBSET, straight_and_resumed, tiny_config

NANO = "bcos_vit_nano_patch4_28"  # 4 blocks
STANDARD_NANO = "vit_nano_patch4_28"
PUBLISHED_NAME = "bcos_vit_tiny_patch16_224"


def save_source(path: Path, name: str = NANO, num_classes: int = 7, **overrides) -> Path:
    """A trained-looking source: ``name`` with random weights and ``num_classes`` named classes,
    saved as bcosvit saves a run's model (``path``: a folder gets ``model.safetensors``)."""
    torch.manual_seed(1)
    model = create_model(name, num_classes=num_classes, **overrides)
    meta = {"model_name": name, **({"classes": [f"class {k}" for k in range(num_classes)]} if num_classes else {})}
    save_weights(model, path / "model.safetensors" if path.suffix != ".safetensors" else path, meta)
    return path


def fmnist_spec() -> DataSpec:
    return load_dataset("fashion-mnist", "train", SUBSET)[1]


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def assert_same_backbone(model: torch.nn.Module, source: torch.nn.Module) -> None:
    mine, theirs = backbone(model.state_dict()), backbone(source.state_dict())
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


def test_a_run_folder_gets_a_new_head_for_the_datasets_classes_and_a_frozen_backbone_stays_its_own(tmp_path):
    source_dir = save_source(tmp_path / "source")
    source = load_model(source_dir)
    spec = fmnist_spec()
    model = finetune_model(tiny_config(finetune_from=str(source_dir)).resolved(), spec)
    assert model.num_classes == 10 and model.head.weight.shape == (10, 64)
    assert model.logit_bias_value == pytest.approx(math.log(1 / 9))  # was log(1/6) for the source's 7 classes
    assert model.config.class_names == spec.classes and model.training
    assert_same_backbone(model, source)  # before the first step: the source's weights

    config = tiny_config(finetune_from=str(source_dir), train_head_only=True, epochs=1)
    metrics = train(config, tmp_path / "probe", progress=False)
    assert math.isfinite(metrics["train_loss"])
    trained = load_model(tmp_path / "probe")
    assert_same_backbone(trained, source)  # frozen: only the head trained
    assert not torch.equal(trained.head.weight, model.head.weight)
    meta = json.loads((tmp_path / "probe" / "model.json").read_text())
    assert meta["classes"] == spec.classes and meta["model_name"] == NANO
    stored = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert stored["finetune_from"] == str(source_dir) and stored["image_size"] == 28
    assert stored["finetune_pretrained"] == "auto"  # a folder brings its own weights


def test_layer_decay_gives_each_block_its_rate_times_lr_scales(tmp_path):
    source = save_source(tmp_path / "weights.safetensors")  # a weights file, not a run folder
    config = tiny_config(finetune_from=str(source), layer_decay=0.5, lr_scales={"head": 0.1})
    model = finetune_model(config.resolved(), fmnist_spec())
    depth = len(model.blocks)

    def expected(name: str) -> float:
        if name.startswith("blocks."):
            return 0.5 ** (depth - int(name.split(".")[1]))
        if name.startswith("tokenizer."):
            return 0.5 ** (depth + 1)
        return 0.1 if name.startswith("head.") else 1.0  # the final norm: 1

    optimizer = build_optimizer(model, config.resolved())
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        assert scale_of[id(param)] == pytest.approx(expected(name)), name
    assert layer_decay_scales(model, 0.5)["blocks.3"] == 0.5 and "norm" not in layer_decay_scales(model, 0.5)

    run = dataclasses.replace(config, train_subset=64, batch_size=32, epochs=1, warmup_steps=0)
    train(run, tmp_path / "run", progress=False)  # the step scales each group's scheduled rate
    groups = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    last = run.lr * warmup_cosine(1, 0, 2)  # the rate of the second (last) step
    assert len({round(g["lr_scale"], 12) for g in groups}) == depth + 3  # blocks, tokenizer, norm, head
    assert all(g["lr"] == pytest.approx(g["lr_scale"] * last) for g in groups)


def fixed_batch_losses(model_name: str, loss: str, source: Path, num_classes: int, steps: int = 8) -> list[float]:
    """The losses of the first ``steps`` steps of fine-tuning ``source`` with a new head of
    ``num_classes`` classes on one fixed batch of random images (Adam/AdamW at lr 1e-3, no warmup)."""
    config = tiny_config(model=model_name, finetune_from=str(source), loss=loss, warmup_steps=0, precision="fp32")
    config = config.resolved()
    classes = [f"c{k}" for k in range(num_classes)]
    spec = DataSpec(1, 28, num_classes, classes, (0.5,), (0.5,))
    model = finetune_model(config, spec)
    if model_name == STANDARD_NANO and loss == "bce":  # the head starts where the B-cos logit bias does
        assert torch.allclose(model.head.bias, torch.full((num_classes,), math.log(1 / (num_classes - 1))))
    trainer = Trainer(model, model, build_optimizer(model, config), None, config, Runtime(0, 1, torch.device("cpu")),
                      num_classes, total_steps=100)  # fmt: skip
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, num_classes, (32,))
    return [float(trainer.step(images, labels, step).loss) / 32 for step in range(steps)]


@pytest.mark.parametrize(
    ("model_name", "loss"), [(NANO, "bce"), (NANO, "ce"), (STANDARD_NANO, "ce"), (STANDARD_NANO, "bce")]
)
def test_a_new_head_of_a_thousand_classes_learns_from_the_first_step_with_bce_and_ce(tmp_path, model_name, loss):
    source = save_source(tmp_path / "source", model_name, num_classes=10)
    classes = 1000
    losses = fixed_batch_losses(model_name, loss, source, classes)
    assert all(math.isfinite(x) for x in losses), losses
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # falling from step 1
    if loss == "bce":  # every class starts at probability 1/C: the off-labels' target (the minimum for them)
        p = 1 / classes
        at_one_over_c = (-(classes - 1) * (p * math.log(p) + (1 - p) * math.log(1 - p)) - math.log(p)) / classes
        assert losses[0] == pytest.approx(at_one_over_c, rel=0.02)
    else:
        assert losses[0] == pytest.approx(math.log(classes), rel=0.02)  # a uniform softmax


def test_cross_entropy_fine_tunes_a_bcos_model_and_resume_continues_exactly(tmp_path):
    source = save_source(tmp_path / "source")
    config = tiny_config(finetune_from=str(source), loss="ce", layer_decay=0.75, epochs=2)
    straight, resumed = straight_and_resumed(config, tmp_path)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=1e-7, msg=key)
    history = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(math.isfinite(h["train_loss"]) for h in history)
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["loss"] == "ce"


def test_a_3_channel_source_of_another_size_reads_fashion_mnist_as_rgb_at_its_size(tmp_path):
    source = save_source(tmp_path / "source", num_classes=10, in_chans=3, image_size=32)
    config = tiny_config(finetune_from=str(source), epochs=1, train_subset=64, test_subset=32, batch_size=32)
    assert config.resolved().image_size == 32
    _, spec = run_dataset_loader(config.resolved())("fashion-mnist", "test", SUBSET, 32)
    assert (spec.in_chans, spec.image_size) == (3, 32)
    train(config, tmp_path / "run", progress=False)
    model = load_model(tmp_path / "run")
    assert (model.in_chans, model.image_size, model.num_classes) == (3, 32, 10)
    # the source had 10 classes of other names: a new head all the same (finetune_new_head unset)
    assert model.config.class_names[0] == "T-shirt/top"


def test_a_shipped_model_on_its_own_classes_keeps_its_head_unless_told(tmp_path):
    name = "bcos_vitc_micro_28"
    shipped = create_model(name, pretrained=True)
    config = tiny_config(model=name, finetune_from=name)
    assert config.resolved().finetune_pretrained == "shipped"
    kept = finetune_model(config.resolved(), fmnist_spec())
    assert torch.equal(kept.head.weight, shipped.head.weight)  # the same ten classes: it trains on
    new = finetune_model(dataclasses.replace(config, finetune_new_head=True).resolved(), fmnist_spec())
    assert not torch.equal(new.head.weight, shipped.head.weight)
    assert_same_backbone(new, shipped)
    source = save_source(tmp_path / "source")  # 7 classes
    with pytest.raises(ConfigError, match="finetune_new_head = false keeps the head .* 7 classes"):
        finetune_model(tiny_config(finetune_from=str(source), finetune_new_head=False).resolved(), fmnist_spec())


def test_the_recipe_takes_model_and_family_from_the_source_and_chains_stages(tmp_path, capsys):
    recipe = load_recipe("finetune").stages[0].config
    assert (recipe.model, recipe.finetune_pretrained, recipe.layer_decay) == (PUBLISHED_NAME, "imagenet", 0.75)
    assert recipe.resolved().image_size == 224 and recipe.weight_decay == 0.0
    standard = save_source(tmp_path / "standard", STANDARD_NANO)
    twin = load_recipe("finetune", {"finetune_from": str(standard), "finetune_pretrained": "auto"}).stages[0].config
    assert twin.model == STANDARD_NANO and twin.weight_decay == 0.05  # the [standard] table applies
    source = save_source(tmp_path / "source")
    text = f"""
description = "a linear probe, then the whole model"
[train]
finetune_from = "{source}"
data_dir = "{SUBSET}"
train_subset = 128
test_subset = 64
batch_size = 64
epochs = 1
warmup_steps = 1
explain_examples = false
[stages.probe]
train_head_only = true
[stages.full]
init_from_stage = "probe"
layer_decay = 0.75
"""
    (tmp_path / "lpft.toml").write_text(text)
    lpft = load_recipe(str(tmp_path / "lpft.toml"))
    runs = lpft.runs(tmp_path / "out")
    assert [config.finetune_from for _, config in runs] == [str(source), str(tmp_path / "out" / "probe")]
    assert all(config.init_from is None for _, config in runs)
    main(["train", "--recipe", str(tmp_path / "lpft.toml"), "--out", str(tmp_path / "out"), "--no-progress"])
    printed = capsys.readouterr().out
    assert "a new head for its 10 classes" in printed and "the source's head for its 10 classes" in printed
    probe, full = load_model(tmp_path / "out" / "probe"), load_model(tmp_path / "out" / "full")
    assert_same_backbone(probe, load_model(source)) and full.num_classes == 10


def test_published_weights_fine_tune_from_the_command_line(reference, hub_dir, publish, tmp_path):
    publish(reference.path)  # the published file of bcos_vit_tiny_patch16_224 at a file:// URL
    out = tmp_path / "run"
    code = main([
        "train", "--finetune-from", PUBLISHED_NAME, "--pretrained", "imagenet", "--dataset", "fashion-mnist",
        "--data-dir", SUBSET, "--epochs", "1", "--batch-size", "4", "--out", str(out), "--no-progress",
        "--set", "train_subset=8", "--set", "test_subset=8", "--set", "train_head_only=true",
        "--set", "warmup_steps=1", "--set", "explain_examples=false",
    ])  # fmt: skip
    assert code == 0
    model, published = load_model(out), create_model(PUBLISHED_NAME, pretrained="imagenet")  # from the cache now
    assert (model.in_chans, model.image_size, model.num_classes) == (3, 224, 10)
    assert model.logit_bias_value == pytest.approx(math.log(1 / 9)) and model.config.class_names[9] == "Ankle boot"
    assert_same_backbone(model, published)
    stored = json.loads((out / "config.json").read_text())
    assert (stored["model"], stored["finetune_pretrained"], stored["image_size"]) == (PUBLISHED_NAME, "imagenet", 224)
    assert stored["layer_decay"] == 0.75 and stored["loss"] == "bce"  # the finetune recipe, "auto" resolved


def test_the_command_line_maps_its_flags_to_the_fine_tuning_settings(tmp_path):
    weights = tmp_path / "bcos_simple_vit_ti_patch16_224-4b0824b1c1.pth"
    args = build_parser().parse_args(["train", "--finetune-from", PUBLISHED_NAME, "--weights", str(weights)])
    recipe, out = train_run_from_args(args)
    config = recipe.stages[0].config
    assert recipe.name == "finetune" and out == Path("runs/finetune")  # the default recipe of --finetune-from
    assert (config.model, config.finetune_weights) == (PUBLISHED_NAME, str(weights))
    assert config.resolved().finetune_pretrained == "imagenet"  # --weights implies it
    source = save_source(tmp_path / "source")
    args = build_parser().parse_args(["train", "--finetune-from", str(source), "--recipe", "fmnist"])
    config = train_run_from_args(args)[0].stages[0].config
    assert (config.model, config.finetune_from, config.finetune_pretrained) == (NANO, str(source), "auto")
    for words, message in [
        (["--pretrained", "imagenet"], "--pretrained chooses the weights of --finetune-from"),
        (["--finetune-from", str(source), "--bcosify-from", "vitc_micro_28"], "give one"),
        (["--weights", str(weights)], "--weights is the weights file of the timm teacher .* or the published"),
    ]:
        with pytest.raises(ConfigError, match=message):
            train_run_from_args(build_parser().parse_args(["train", *words]))


BAD_SETTINGS = [
    ({"finetune_from": "bcos_vit_tinyy_patch16_224"}, "unknown model name 'bcos_vit_tinyy_patch16_224'"),
    ({"finetune_from": "runs/nothing-here"}, "no run folder or weights file there"),
    ({"finetune_from": NANO}, "no weights ship for it and none are published"),
    ({"finetune_from": PUBLISHED_NAME, "finetune_pretrained": "shipped"}, "no weights for it ship inside"),
    ({"finetune_from": "bcos_vitc_micro_28", "finetune_pretrained": "imagenet"}, "no published ImageNet weights"),
    ({"finetune_from": "bcos_vitc_micro_28", "finetune_pretrained": "latest"}, "finetune_pretrained must be one of"),
    ({"finetune_from": "SOURCE", "finetune_pretrained": "imagenet"}, "brings its own weights"),
    ({"finetune_from": "SOURCE", "bcosify_from": "vitc_micro_28"}, "and bcosify_from 'vitc_micro_28' from others"),
    ({"finetune_from": "SOURCE", "init_from": "SOURCE"}, "and init_from .* give one of them"),
    ({"finetune_from": "SOURCE", "align_to": "vitc_micro_28"}, "and align_to 'vitc_micro_28' from others"),
    ({"finetune_from": "SOURCE", "model": "bcos_vitc_micro_28"}, f"is a {NANO} model: model must be {NANO}"),
    ({"finetune_from": "SOURCE", "model_options": {"pos_embed": "rope"}}, "leave model_options empty"),
    ({"finetune_from": "HEADLESS"}, "is a headless backbone .* Set finetune_new_head = true"),
    ({"finetune_new_head": True}, "finetune_new_head chooses how finetune_from is read"),
    ({"finetune_weights": "x.pth"}, "finetune_weights chooses how finetune_from is read"),
    ({"layer_decay": 0.0}, r"layer_decay must lie in \(0, 1\]"),
    ({"layer_decay": 1.5}, r"layer_decay must lie in \(0, 1\]"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_wrong_fine_tuning_settings_are_clear_config_errors(tmp_path, settings, message):
    paths = {"SOURCE": save_source(tmp_path / "source"), "HEADLESS": save_source(tmp_path / "h", num_classes=0)}
    settings = {
        key: str(paths[value]) if isinstance(value, str) and value in paths else value
        for key, value in settings.items()
    }
    with pytest.raises(ConfigError, match=message):
        tiny_config(**settings).validate()


def test_a_headless_backbone_is_fine_tuned_when_a_new_head_is_asked_for(tmp_path):
    source = save_source(tmp_path / "headless", num_classes=0)
    config = tiny_config(finetune_from=str(source), finetune_new_head=True, train_head_only=True)
    model = finetune_model(config.resolved(), fmnist_spec())  # e.g. a linear probe of its features
    assert model.num_classes == 10 and model.logit_bias_value == pytest.approx(math.log(1 / 9))
    assert_same_backbone(model, load_model(source))


def test_a_fine_tuned_run_is_itself_a_source_whose_head_fits_its_classes(tmp_path):
    # a fine-tuned run folder is an ordinary one: it can itself be fine-tuned further
    source = save_source(tmp_path / "source")
    train(tiny_config(finetune_from=str(source), epochs=1), tmp_path / "first", progress=False)
    second = tiny_config(finetune_from=str(tmp_path / "first"), epochs=1)
    assert second.resolved().finetune_from == str(tmp_path / "first")
    model = finetune_model(second.resolved(), fmnist_spec())
    first = load_file(str(tmp_path / "first" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in first.items())  # the same classes: head kept
