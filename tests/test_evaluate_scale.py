"""``bcosvit evaluate`` at ImageNet scale: the test set streamed (memory that does not grow with it),
its pieces equal to the in-memory protocol, stratified subsets, sharding over ``torchrun`` processes
equal to one process, and a run trained on a 1000-class tree evaluated and explained."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bcosvit import create_model
from bcosvit.app.cli import main
from bcosvit.app.data import batch_to_device, dataset_labels, load_dataset, load_fashion_mnist, stratified_indices
from bcosvit.app.evaluation import (
    EvalConfig,
    EvalRuntime,
    PixelSums,
    faithfulness_indices,
    load_test_set,
    predict_test_set,
    tensor_test_set,
)
from bcosvit.errors import ConfigError
from bcosvit.metrics import (
    confident_images_by_class,
    confident_indices_by_class,
    grid_pointing_game,
    predict_logits,
    sample_grids,
    score_grid_cells,
    target_probabilities,
    topk_accuracy,
)
from bcosvit.weights.imagenet import imagenet_class_names

from .imagenet_tree import make_imagenet_tree
from .test_imagenet import _fit_head, _save_run, _tiny_imagenet_model
from .test_train import SUBPROCESS_ENV, needs_torchrun, torchrun_two

SUBSET = str(Path(__file__).parent / "data" / "fashion-mnist")


@pytest.fixture(scope="module")
def fashion():
    """The shipped B-cos model and 200 committed Fashion-MNIST test images in [0, 1]."""
    ds = load_fashion_mnist("test", SUBSET)
    return create_model("bcos_vitc_micro_28", pretrained=True), ds.images[:200].float() / 255, ds.labels[:200]


def test_shards_cover_every_item_once_in_order_cut_at_multiples_of_the_batch_size():
    for count, batch, world in ((100, 8, 2), (7, 32, 3), (0, 4, 2), (33, 4, 4)):
        shards = [EvalRuntime(rank=r, world_size=world).shard(count, batch) for r in range(world)]
        assert [i for shard in shards for i in shard] == list(range(count)), (count, batch, world)
        assert all(shard.start % batch == 0 for shard in shards if shard)
    assert EvalRuntime().shard(10, 4) == range(10)


def test_the_confident_selection_from_predictions_is_the_selection_from_logits():
    torch.manual_seed(1)
    logits, labels = 4 * torch.randn(300, 7), torch.randint(0, 7, (300,))
    logits[:40] = logits[40:80]  # equal confidences keep the lower index first
    labels[:40] = labels[40:80]
    images = torch.rand(300, 1, 4, 4)
    for is_bcos in (True, False):
        expected = confident_images_by_class(None, images, labels, logits=logits, is_bcos=is_bcos)
        confidence = target_probabilities(logits, labels, is_bcos).double()
        found = confident_indices_by_class(logits.argmax(dim=1), confidence, labels, 7)
        assert sum(map(len, expected[0])) > 20  # a selection worth comparing
        for a, b in zip(expected, found, strict=True):
            assert len(a) == len(b) == 7 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_streamed_pass_keeps_what_the_logits_of_the_whole_set_say(fashion):
    model, images, labels = fashion
    runtime = EvalRuntime()  # fp32 on the CPU
    predictions = predict_test_set(model, tensor_test_set(images, labels), runtime, batch_size=48)
    logits = predict_logits(model, images)
    assert torch.equal(predictions.predicted, logits.argmax(dim=1))
    assert torch.equal(predictions.confidence, target_probabilities(logits, labels, True).double())
    assert predictions.accuracy == topk_accuracy(logits, labels)
    torch.testing.assert_close(predictions.pixels.mean(), images.mean(dim=(0, 2, 3))[:, None, None])
    # pixel sums added batch by batch are the sums of the whole set, in float64
    halves = PixelSums.of(images[:77]) + PixelSums.of(images[77:])
    torch.testing.assert_close(halves.sums, images.double().sum(dim=(0, 2, 3)), rtol=1e-12, atol=0)


def test_grid_cells_scored_in_shards_cut_at_the_batch_size_are_the_whole_game(fashion):
    model, images, labels = fashion
    confident = confident_images_by_class(model, images, labels)
    game = grid_pointing_game(model, images, labels, _gradient, grid=2, num_grids=5, batch_size=6, confident=confident)
    classes, image_indices = sample_grids(confident[0], 2, 5)
    assert torch.equal(classes, game.classes) and torch.equal(image_indices, game.image_indices)
    parts = [range(0, 12), range(12, 18), range(18, 20)]
    scores = [score_grid_cells(model, images, classes, image_indices, _gradient, 2, pairs, 6) for pairs in parts]
    assert torch.equal(torch.cat(scores).reshape(5, 4), game.scores)
    with pytest.raises(Exception, match="contiguous range within"):
        score_grid_cells(model, images, classes, image_indices, _gradient, 2, range(0, 21))


def _gradient(model, x, target):
    x = x.detach().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad


def test_faithfulness_images_are_stratified_by_class_not_the_first_ones():
    labels = torch.arange(10).repeat_interleave(30)  # in class order, as a folder tree is listed
    chosen = faithfulness_indices(labels, 20, seed=0)
    assert chosen.tolist() == sorted(chosen.tolist()) and len(set(chosen.tolist())) == 20
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [2] * 10
    assert faithfulness_indices(labels, 500, seed=0).tolist() == list(range(300))


def test_a_stratified_test_subset_covers_every_class_and_the_log_says_so(tmp_path):
    tree = make_imagenet_tree(tmp_path, num_classes=20, val_per_class=5, sizes=(16, 20), splits=("val",))
    model = _tiny_imagenet_model(image_size=16, patch_size=8, resize_size=18)
    lines = []
    data = load_test_set({"m": model}, "folder", tree, {"m": "m"}, test_subset=20, seed=3, log=lines.append)
    labels = dataset_labels(data)
    assert len(labels) == 20 and len(set(labels.tolist())) == 20  # the first 20 files: 4 classes
    assert lines == [f"evaluating m on 20 of 100 folder val images, stratified by class (seed 3), from {tree}/val"]
    assert dataset_labels(load_test_set({"m": model}, "folder", tree, {"m": "m"}, 20, 3, log=print)).tolist() == (
        labels.tolist()
    )  # the seed fixes the draw


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_evaluate_on_cuda_without_a_cuda_device_is_refused_before_any_work(tmp_path, capsys):
    code = main(["evaluate", "--device", "cuda", "--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "device (--device) cuda was asked for but torch finds no CUDA device" in err
    assert "use --device cpu" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match=r"workers \(--workers\) must be >= 0"):
        EvalConfig(workers=-1).validate()


def _bcosvit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bcosvit", *args], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900
    )


def _without(value, keys: set[str]):
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _assert_close(a, b, path: str = "") -> None:
    """Equal structures, numbers within float32 rounding of what they were computed from."""
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    else:
        assert a == b, path


@pytest.mark.ddp
@needs_torchrun
def test_two_evaluation_processes_write_the_metrics_of_one(tmp_path):
    # a small batch, so that each process gets a share of the test set, of the grid cells of both
    # sizes and of the faithfulness images (cut at multiples of the batch size); fp32 everywhere
    common = ["evaluate", "--model", "bcos_vitc_micro_28", "vitc_micro_28", "--data-dir", SUBSET]
    common += ["--test-subset", "160", "--grids", "3", "--faithfulness-images", "20", "--batch-size", "8"]
    common += ["--methods", "gradient", "integrated_gradients", "bcos", "--ig-steps", "2", "--precision", "fp32"]
    single = _bcosvit(*common, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    two = torchrun_two("-m", "bcosvit", *common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "in 2 process(es)" in two.stdout and two.stdout.count("bcos_vitc_micro_28: top-1") == 1  # rank 0 logs
    one_metrics, two_metrics = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert one_metrics["processes"] == 1 and two_metrics["processes"] == 2
    timings = {"seconds", "processes", "accuracy_pass_images_per_s"}
    _assert_close(_without(one_metrics, timings), _without(two_metrics, timings))
    bcos = two_metrics["models"][0]
    assert bcos["methods"]["bcos"]["deletion"]["zero"]["num_images"] == 20 and bcos["completeness"]["count"] == 20.0
    assert {p.name for p in (tmp_path / "two").iterdir()} >= {"metrics.json", "report.html", "grid_examples.png"}


def _peak_rss(args: list[str]) -> int:
    """Peak resident memory in bytes of the main process of ``bcosvit ARGS`` run in a new interpreter
    (where the old evaluation held the test set). Not its children's: a forked child starts with
    its parent's pages, so their peak says little about the DataLoader workers' own memory."""
    code = (
        "import resource, sys\n"
        "from bcosvit.app.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(f'PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}')\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(next(line for line in done.stdout.splitlines() if line.startswith("PEAK")).split()[1])


def fitted_imagenet_run(
    val: Path, folder: Path, image_size: int, resize_size: int, per_class: int, patch_size: int = 32, **options
) -> Path:
    """A one-block standard 1000-class model for ``image_size`` inputs (``options``: other ``ViTConfig``
    fields) whose head is fitted on ``per_class`` images of each class of the folder ``val`` (so that
    it classifies some test images confidently), saved as a run folder (``benchmarks/evaluate_scale.py``
    uses it too)."""
    model = _tiny_imagenet_model(
        bcos=False, image_size=image_size, patch_size=patch_size, resize_size=resize_size, **options
    )
    data, _ = load_dataset("folder", "val", val, image_size, resize_size=resize_size)
    few = stratified_indices(data.targets, per_class * len(set(data.targets.tolist())), seed=0)
    images = batch_to_device(torch.stack([data[int(i)][0] for i in few]), "cpu")
    _fit_head(model, images, torch.from_numpy(data.targets[few]))
    return _save_run(model, folder)


@pytest.mark.slow
def test_evaluate_memory_does_not_grow_with_the_number_of_test_images(tmp_path):
    # 224-pixel images: the old evaluation held every test image as float32, 602 kB each, so 700
    # more images cost it 421 MB; streamed, they cost 16 bytes each
    size, counts = 224, {"small": 10, "large": 80}  # images per class, 10 classes
    trees = {
        name: make_imagenet_tree(tmp_path / name, num_classes=10, val_per_class=n, sizes=(232, 250), splits=("val",))
        for name, n in counts.items()
    }
    run = fitted_imagenet_run(trees["small"] / "val", tmp_path / "run", size, 232, per_class=4)
    settings = ["--methods", "gradient", "--grid-sizes", "2", "--grids", "2", "--faithfulness-images", "4"]
    settings += ["--baselines", "zero", "--workers", "1", "--precision", "fp32"]
    peaks = {
        name: _peak_rss(
            ["evaluate", "--checkpoint", str(run), "--dataset", "folder", "--data-dir", str(tree / "val")]
            + settings
            + ["--out", str(tmp_path / f"out-{name}")]
        )
        for name, tree in trees.items()
    }
    for name in counts:
        metrics = json.loads((tmp_path / f"out-{name}" / "metrics.json").read_text())
        assert metrics["num_test_images"] == 10 * counts[name]
    # what the old code held beyond the small set (it measured about twice that: 1.2 MB per image);
    # the peaks of two runs of the same set differ by up to 20 MB (allocator), well under a fifth of it
    held_by_the_old_code = 10 * (counts["large"] - counts["small"]) * 3 * size * size * 4
    growth = peaks["large"] - peaks["small"]
    assert growth < 0.2 * held_by_the_old_code, (peaks, held_by_the_old_code)


@pytest.mark.slow
def test_a_run_trained_on_a_1000_class_tree_is_evaluated_and_explained_with_imagenet_names(tmp_path):
    tree = make_imagenet_tree(tmp_path / "tree", num_classes=1000, train_per_class=1, val_per_class=1, sizes=(16, 24))
    run = tmp_path / "run"
    trained = _bcosvit(
        "train", "--dataset", "folder", "--data-dir", str(tree), "--model", "bcos_vit_nano_patch4_28",
        "--epochs", "1", "--batch-size", "125", "--no-progress", "--out", str(run),
        "--set", "image_size=16", "--set", "warmup_steps=2", "--set", "precision=fp32",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = _bcosvit(
        "evaluate", "--checkpoint", str(run), "--dataset", "folder", "--data-dir", str(tree / "val"),
        "--grids", "2", "--faithfulness-images", "8", "--methods", "gradient", "bcos", "--baselines", "zero",
        "--out", str(tmp_path / "evaluation"),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"on 1000 folder val images from {tree}/val" in evaluated.stdout
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["num_test_images"] == 1000 and metrics["models"][0]["completeness"]["count"] == 8.0
    files = sorted(str(p) for p in (tree / "val").glob("*/*.JPEG"))[:3]  # tench, goldfish, great white shark
    explained = _bcosvit("explain", *files, "--checkpoint", str(run), "--topk", "2", "--out", str(tmp_path / "expl"))
    assert explained.returncode == 0, explained.stderr[-3000:]
    lines = [line for line in explained.stdout.splitlines() if ".JPEG" in line]
    # each line ranks the top classes by name: "tench 0.012, goldfish 0.011 | ..."
    named = [
        [name for name in imagenet_class_names() if f": {name} 0." in line or f", {name} 0." in line] for line in lines
    ]
    assert len(lines) == 3 and all(named), explained.stdout
