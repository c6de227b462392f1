"""``bcosvit evaluate`` on the shipped pair: metrics, figures and a report that renders in Chromium."""

import json

import pytest

from bcosvit.cli import main

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
            assert 0 <= entry["deletion"]["mean_auc"] <= 1 and 0 <= entry["insertion"]["mean_auc"] <= 1
    assert models["bcos_vitc_micro_28"]["completeness"]["abs_max"] < 1e-4


def test_report_renders_with_every_figure_and_no_console_errors(evaluation):
    names = {"examples.png", "grid_examples.png", "localisation.png", "deletion.png", "insertion.png"}
    assert names <= {p.name for p in evaluation.iterdir()}
    check = check_page(evaluation / "report.html", evaluation / "screenshot.png")
    assert check.console_errors == [] and check.failed_requests == [] and check.broken_images == []
    assert check.images == len(names) and check.images_ok_marker == "true"
    assert check.screenshot.stat().st_size > 20_000
