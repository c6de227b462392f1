"""``bcosvit evaluate`` on the shipped pair: metrics, figures and a report that renders in Chromium."""

import json

import pytest
import torch

from bcosvit.cli import main
from bcosvit.errors import ConfigError
from bcosvit.evaluate import EvalConfig, baseline_value

from .browser import check_page

SUBSET = "tests/data/fashion-mnist"


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


def test_report_renders_with_every_figure_and_no_console_errors(evaluation):
    names = {"examples.png", "grid_examples.png", "localisation.png", "deletion.png", "insertion.png"}
    assert names <= {p.name for p in evaluation.iterdir()}
    check = check_page(evaluation / "report.html", evaluation / "screenshot.png")
    assert check.console_errors == [] and check.failed_requests == [] and check.broken_images == []
    assert check.images == len(names) and check.images_ok_marker == "true"
    assert check.screenshot.stat().st_size > 20_000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"baselines": ("zero", "blur")}, "deletion baseline must be 'zero', 'mean' or a number"),
        ({"baselines": ()}, "at least one deletion baseline"),
        ({"grids": (1,)}, "grid sizes must be >= 2"),
        ({"methods": ("lime",)}, "unknown method"),
    ],
)
def test_bad_evaluation_settings_are_rejected_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**overrides).validate()


def test_mean_baseline_is_the_per_channel_mean_of_the_images():
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    images[:, 2] = 0.25
    value = baseline_value("mean", images)
    assert value.shape == (3, 1, 1) and value.flatten().tolist() == [0.5, 0.5, 0.25]
    assert baseline_value("zero", images) == 0.0 and baseline_value("0.5", images) == 0.5
