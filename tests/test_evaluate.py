"""``bcosvit evaluate`` on the shipped pair: metrics, figures and a report that renders in Chromium."""

import json
from pathlib import Path

import pytest
import torch

from bcosvit import create_model
from bcosvit.app.cli import build_parser, main
from bcosvit.app.data import FASHION_MNIST_CLASSES, DataSpec, load_fashion_mnist
from bcosvit.app.evaluation import (
    EvalConfig,
    baseline_value,
    check_models_fit_dataset,
    check_same_preprocessing,
    evaluate_model,
    evaluate_models,
)
from bcosvit.app.precision import resolve_precision
from bcosvit.errors import ConfigError
from bcosvit.metrics import CompletenessStats, CurveResult, GridResult, TopkAccuracy
from bcosvit.weights.checkpoint import save_weights

from .browser import check_page

SUBSET = str(Path(__file__).parent / "data" / "fashion-mnist")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    code = main(
        [
            "evaluate",
            "--model",
            "bcos_vitc_micro_28",
            "vitc_micro_28",
            "--data-dir",
            SUBSET,
            "--test-subset",
            "400",
            "--grids",
            "6",
            "--faithfulness-images",
            "24",
            "--ig-steps",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
def test_evaluation_writes_metrics_for_every_method_and_model(evaluation):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    models = {m["name"]: m for m in metrics["models"]}
    assert set(models) == {"bcos_vitc_micro_28", "vitc_micro_28"}
    assert "bcos" in models["bcos_vitc_micro_28"]["methods"] and "bcos" not in models["vitc_micro_28"]["methods"]
    for model in models.values():
        assert model["accuracy"]["top1"] > 80
        for method, entry in model["methods"].items():
            for key in ("grid2", "grid3"):
                assert entry[key]["num_grids"] == 6 and 0 <= entry[key]["mean"] <= 1, (method, key)
            for mode in ("deletion", "insertion"):
                assert set(entry[mode]) == {"zero", "mean"}, (method, mode)
                assert all(0 <= entry[mode][b]["mean_auc"] <= 1 for b in ("zero", "mean")), (method, mode)
            assert entry["deletion"]["zero"]["baseline"] == 0.0
            assert entry["deletion"]["mean"]["baseline"] == [[[pytest.approx(0.286, abs=0.02)]]]  # Fashion-MNIST mean
    assert models["bcos_vitc_micro_28"]["completeness"]["abs_max"] < 1e-4
    assert all(model["source"] == name for name, model in models.items())  # --model names: the name
    # where it ran: the accuracy pass in the precision "auto" picks there, everything else in fp32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert metrics["device"] == device.type and metrics["processes"] == 1 and metrics["num_test_images"] == 400
    assert metrics["precision"]["accuracy"] == resolve_precision("auto", device).precision
    assert metrics["precision"]["attributions_curves_completeness"] == "fp32"


@pytest.mark.slow
def test_methods_with_a_reference_are_also_measured_relative_to_each_baseline(evaluation):
    models = {m["name"]: m for m in json.loads((evaluation / "metrics.json").read_text())["models"]}
    for model in models.values():
        relative = {name for name, e in model["methods"].items() if "relative" in e}
        assert relative == ({"integrated_gradients", "bcos"} if model["is_bcos"] else {"integrated_gradients"})
        for name in relative:
            entry = model["methods"][name]
            for mode in ("deletion", "insertion"):
                for base in ("zero", "mean"):
                    assert entry["relative"][mode][base]["baseline"] == entry[mode][base]["baseline"]
                # Integrated gradients start from black already: only the mean baseline changes them.
                changed = {b for b in ("zero", "mean") if entry["relative"][mode][b] != entry[mode][b]}
                assert changed == ({"mean"} if name == "integrated_gradients" else {"zero", "mean"}), (name, mode)
    html = (evaluation / "report.html").read_text()
    assert "bcos relative to the baseline" in html and "integrated_gradients relative to the baseline" in html


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_with_every_figure_and_no_console_errors(evaluation):
    names = {"examples.png", "grid_examples.png", "localisation.png", "deletion.png", "insertion.png"}
    assert names <= {p.name for p in evaluation.iterdir()}
    check = check_page(evaluation / "report.html", evaluation / "screenshot.png")
    assert check.console_errors == [] and check.failed_requests == [] and check.broken_images == []
    assert check.images == len(names) and check.images_ok_marker == "true"
    assert check.screenshot.stat().st_size > 20_000


def test_evaluate_model_keeps_results_typed_and_leaves_the_model_as_it_was():
    model = create_model("bcos_vitc_micro_28", pretrained=True).train()
    model.set_grad_checkpointing(True)
    ds = load_fashion_mnist("test", SUBSET)
    images, labels = ds.images[:200].float() / 255, ds.labels[:200]
    config = EvalConfig(
        grids=(2,), num_grids=2, faithfulness_images=4, steps=2, methods=("gradient", "bcos"), baselines=("zero",)
    )
    result = evaluate_model("m", model, images, labels, config, log=lambda line: None)
    assert all(m.training for m in model.modules()) and model.grad_checkpointing
    assert isinstance(result.accuracy, TopkAccuracy) and isinstance(result.completeness, CompletenessStats)
    bcos, gradient = result.methods["bcos"], result.methods["gradient"]
    assert isinstance(bcos.grids[2], GridResult) and isinstance(bcos.curves["deletion"]["zero"], CurveResult)
    assert isinstance(bcos.relative["insertion"]["zero"], CurveResult) and gradient.relative is None
    written = json.loads(json.dumps(result.to_dict()))
    assert written["accuracy"] == {"top1": result.accuracy.top1, "top5": result.accuracy.top5}
    assert list(written["methods"]["bcos"]) == ["grid2", "deletion", "insertion", "relative", "seconds"]
    assert list(written["methods"]["gradient"]) == ["grid2", "deletion", "insertion", "seconds"]
    assert written["methods"]["bcos"]["grid2"] == bcos.grids[2].to_dict(include_scores=False)
    assert written["completeness"]["abs_max"] == result.completeness.absolute.max < 1e-4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"baselines": ("zero", "blur")}, "deletion baseline must be 'zero', 'mean' or a number"),
        ({"baselines": ()}, "at least one deletion baseline"),
        ({"grids": (1,)}, "grid sizes must be >= 2"),
        ({"methods": ("lime",)}, "unknown method"),
        ({"baselines": ("zero", "nan")}, "deletion baseline must be a finite number"),
        ({"baselines": ("inf",)}, "deletion baseline must be a finite number"),
        ({"test_subset": -5}, r"test_subset \(--test-subset\) must be >= 1"),
        ({"test_subset": 0}, r"test_subset \(--test-subset\) must be >= 1"),
        ({"seed": -1}, r"seed \(--seed\) must lie in \[0, 2\*\*32\)"),
        ({"num_grids": 0}, r"num_grids \(--grids\) must be >= 1"),
        ({"ig_steps": 0}, r"ig_steps \(--ig-steps\) must be >= 1"),
        ({"faithfulness_images": -1}, r"faithfulness_images \(--faithfulness-images\) must be >= 1"),
        ({"num_grids": "30"}, r"'num_grids \(--grids\)' must be of type int, got '30'"),
        ({"seed": True}, r"'seed \(--seed\)' must be of type int, got True"),
        ({"steps": 2.0}, r"'steps' must be of type int, got 2.0"),
        ({"test_subset": 1.5}, r"'test_subset \(--test-subset\)' must be of type int or null"),
        ({"grids": (2, 3.0)}, r"grids \(--grid-sizes\) must be a sequence of whole numbers"),
        ({"grids": 2}, r"grids \(--grid-sizes\) must be a sequence of whole numbers"),
        ({"methods": "bcos"}, r"methods \(--methods\) must be a sequence of names"),
        ({"baselines": ("zero", 0.5)}, r"baselines \(--baselines\) must be a sequence of strings"),
    ],
)
def test_bad_evaluation_settings_are_rejected_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**overrides).validate()


def test_grids_with_more_cells_than_classes_are_rejected_before_any_work(tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"a 4x4 grid \(--grid-sizes\) needs 16 distinct classes but the models have 10"
    ):
        EvalConfig(grids=(2, 4)).validate(num_classes=10)
    EvalConfig(grids=(2, 3)).validate(num_classes=10)
    lines = []
    with pytest.raises(ConfigError, match=r"a 4x4 grid \(--grid-sizes\) needs 16 distinct classes"):
        evaluate_models(
            {"m": create_model("bcos_vitc_micro_28")},
            torch.rand(8, 1, 28, 28),
            torch.arange(8) % 10,
            tmp_path / "direct",
            EvalConfig(grids=(2, 4)),
            log=lines.append,
        )
    assert lines == [] and not (tmp_path / "direct").exists()  # nothing measured, nothing written
    assert _evaluate(tmp_path, "--grid-sizes", "2", "4", "--test-subset", "8") == 2
    captured = capsys.readouterr()
    assert "a 4x4 grid (--grid-sizes) needs 16 distinct classes" in captured.err
    assert "top-1" not in captured.out and not (tmp_path / "out" / "metrics.json").exists()


def test_mean_baseline_is_the_per_channel_mean_of_the_images():
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    images[:, 2] = 0.25
    value = baseline_value("mean", images)
    assert value.shape == (3, 1, 1) and value.flatten().tolist() == [0.5, 0.5, 0.25]
    assert baseline_value("zero", images) == 0.0 and baseline_value("0.5", images) == 0.5


def _evaluate(tmp_path, *options, data_dir=SUBSET):
    return main(
        ["evaluate", "--model", "bcos_vitc_micro_28", "--data-dir", data_dir, "--out", str(tmp_path / "out"), *options]
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--test-subset", "-5"], "test_subset (--test-subset) must be >= 1"),
        (["--test-subset", "0"], "test_subset (--test-subset) must be >= 1"),
        (["--grids", "0"], "num_grids (--grids) must be >= 1"),
        (["--faithfulness-images", "-1"], "faithfulness_images (--faithfulness-images) must be >= 1"),
        (["--ig-steps", "0"], "ig_steps (--ig-steps) must be >= 1"),
        (["--grid-sizes", "1"], "grid sizes must be >= 2"),
        (["--baselines", "nan"], "deletion baseline must be a finite number"),
        (["--seed", "-1"], "seed (--seed) must lie in"),
    ],
)
def test_evaluate_rejects_bad_options_before_loading_data(tmp_path, capsys, options, message):
    # no dataset in --data-dir: reading it first would fail with another message
    assert _evaluate(tmp_path, *options, data_dir=str(tmp_path / "no-data")) == 2
    err = capsys.readouterr().err
    assert err.startswith("bcosvit evaluate: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["existing file", "under /proc", "parent is a file"])
def test_evaluate_refuses_an_unwritable_out_before_any_work(tmp_path, capsys, where):
    (tmp_path / "file").write_text("not a folder")
    out = {
        "existing file": tmp_path / "file",
        "under /proc": Path("/proc/bcosvit-out"),
        "parent is a file": tmp_path / "file" / "evaluation",
    }[where]
    # no dataset in --data-dir: reading it first would fail with another message
    no_data = str(tmp_path / "no-data")
    code = main(["evaluate", "--model", "bcos_vitc_micro_28", "--data-dir", no_data, "--out", str(out)])
    assert code == 2 and f"output folder (--out) {out}" in capsys.readouterr().err
    images, labels, lines = torch.rand(4, 1, 28, 28), torch.arange(4), []
    with pytest.raises(ConfigError, match=f"output folder \\(--out\\) {out}"):
        evaluate_models({"m": create_model("bcos_vitc_micro_28")}, images, labels, out, EvalConfig(), log=lines.append)
    assert lines == [] and (tmp_path / "file").read_text() == "not a folder"


def _tiny_checkpoint(path: Path, num_classes: int = 10, train_config: dict | None = None) -> Path:
    """A one-block B-cos model for 28x28 greyscale images saved like a training run's weights."""
    classes = list(FASHION_MNIST_CLASSES) if num_classes == 10 else [f"class {i}" for i in range(num_classes)]
    model = create_model(
        "bcos_vit_nano_patch4_28", depth=1, embed_dim=16, num_heads=2, num_classes=num_classes, class_names=classes
    )
    meta = {"model_name": "bcos_vit_nano_patch4_28", "classes": classes, "train_config": train_config or {}}
    return save_weights(model, path, meta)


def test_a_model_for_other_classes_is_refused_saying_which_data_fits(tmp_path, capsys):
    weights = _tiny_checkpoint(
        tmp_path / "run20" / "model.safetensors", 20, {"dataset": "folder", "data_dir": "/data/shapes"}
    )
    code = main(["evaluate", "--checkpoint", str(weights.parent), "--data-dir", SUBSET, "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2 and "Traceback" not in err
    assert "run20" in err and "has 20 classes but the dataset has 10" in err
    assert "trained with --dataset folder --data-dir /data/shapes" in err
    assert "evaluating" not in captured.out and not (tmp_path / "o" / "metrics.json").exists()


def test_the_dataset_checks_name_the_model_and_what_it_was_trained_with():
    model = create_model("bcos_vit_nano_patch4_28", depth=1, embed_dim=16, num_heads=2, num_classes=20)
    spec = DataSpec(1, 28, 10, list(FASHION_MNIST_CLASSES), (0.5,), (0.5,))
    models, sources = {"run": model}, {"run": "/runs/run"}
    expected = r"model run \(/runs/run\) has 20 classes but the dataset has 10: it does not fit fashion-mnist in /d; "
    with pytest.raises(ConfigError, match=expected + "pass the --dataset and --data-dir it was trained on"):
        check_models_fit_dataset(models, sources, spec, "fashion-mnist", "/d")
    with pytest.raises(ConfigError, match=expected + "it was trained with --dataset cifar10$"):
        check_models_fit_dataset(models, sources, spec, "fashion-mnist", "/d", lambda source: "--dataset cifar10")
    other = create_model("bcos_vit_nano_patch4_28", depth=1, embed_dim=16, num_heads=2, resize_size=32)
    check_same_preprocessing({"a": model, "b": other}, "fashion-mnist")  # resized only in folder datasets
    with pytest.raises(ConfigError, match=r"resize images differently .* \(resize_size a: None, b: 32\)"):
        check_same_preprocessing({"a": model, "b": other}, "folder")


def test_models_with_the_same_file_or_folder_name_are_all_evaluated_under_distinct_labels(
    tmp_path, monkeypatch, capsys
):
    seen = {}

    def record(models, data, out, config, dataset="", log=print, sources=None, runtime=None):
        seen.update(models=models, sources=sources)

    monkeypatch.setattr("bcosvit.app.evaluation.run.evaluate_test_set", record)  # what evaluate_dataset calls
    files = [_tiny_checkpoint(tmp_path / folder / "model.safetensors") for folder in ("a", "b")]
    runs = [_tiny_checkpoint(tmp_path / parent / "run" / "model.safetensors").parent for parent in ("x", "y")]
    checkpoints = [str(p) for p in files + runs]
    names = ["bcos_vitc_micro_28", "bcos_vitc_micro_28"]
    code = main(
        ["evaluate", "--checkpoint", *checkpoints, "--model", *names, "--data-dir", SUBSET, "--test-subset", "8"]
        + ["--out", str(tmp_path / "out")]
    )
    assert code == 0
    labels = [
        "a/model.safetensors",
        "b/model.safetensors",
        "x/run",
        "y/run",
        "bcos_vitc_micro_28",
        "bcos_vitc_micro_28#2",
    ]
    assert list(seen["models"]) == labels
    assert list(seen["sources"].values()) == checkpoints + names
    out = capsys.readouterr().out
    assert all(f"model {label}: {source}" in out for label, source in zip(labels, checkpoints + names))


def test_the_evaluate_flags_default_to_eval_configs_fields(capsys):
    args = build_parser().parse_args(["evaluate"])
    fields = {
        "grid_sizes": "grids",
        "grids": "num_grids",
        "faithfulness_images": "faithfulness_images",
        "ig_steps": "ig_steps",
        "methods": "methods",
        "seed": "seed",
        "baselines": "baselines",
        "test_subset": "test_subset",
        "batch_size": "batch_size",
        "device": "device",
        "precision": "precision",
        "workers": "workers",
    }
    defaults = EvalConfig()
    for flag, name in fields.items():
        value = getattr(args, flag)
        assert (tuple(value) if isinstance(value, list) else value) == getattr(defaults, name), flag
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"(default {defaults.num_grids})" in shown and f"(default {defaults.ig_steps})" in shown
    assert f"(default {defaults.faithfulness_images})" in shown and "grid sizes (default 2 3)" in shown
    assert "(default: zero mean)" in shown


def test_a_class_mismatch_is_told_by_counts_and_first_differences_not_whole_lists():
    from bcosvit.app.evaluation.protocol import class_differences
    from bcosvit.weights.imagenet import imagenet_class_names, imagenet_wnids

    text = class_differences(imagenet_class_names(), imagenet_wnids())
    assert text.startswith("1000 model classes, 1000 dataset classes, 1000 differ (class 0: 'tench' vs 'n01440764';")
    assert text.endswith("and 997 more)") and len(text) < 300
    assert class_differences(["a", "b"], ["a", "b", "c"]) == "2 model classes, 3 dataset classes"
