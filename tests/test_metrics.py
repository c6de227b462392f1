"""Metrics: grid pointing game, deletion/insertion curves, completeness statistics, confidence intervals,
top-k accuracy, and the tiling and accuracy that training shares with them.

Stub models with known logits make every expected value exact or analytic; the images are the
committed real Fashion-MNIST subset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bcosvit
from bcosvit import metrics
from bcosvit.app.data import load_fashion_mnist
from bcosvit.app.training import TrainConfig
from bcosvit.app.training.loop import evaluate
from bcosvit.app.training.mosaics import mosaic
from bcosvit.errors import ConfigError, InputError

DATA = Path(__file__).parent / "data" / "fashion-mnist"


@pytest.fixture(scope="module")
def fmnist() -> tuple[Tensor, Tensor]:
    """1000 real Fashion-MNIST test images ``(1000, 1, 28, 28)`` float64 in [0, 1] and labels."""
    ds = load_fashion_mnist("test", DATA)
    return ds.images.double() / 255, ds.labels


class LookupModel(nn.Module):
    """Returns fixed logits for each known image (recognised by exact match)."""

    def __init__(self, images: Tensor, logits: Tensor, is_bcos: bool = True) -> None:
        super().__init__()
        self.register_buffer("keys", images.flatten(1))
        self.register_buffer("table", logits)
        self.is_bcos = is_bcos

    def forward(self, x: Tensor) -> Tensor:
        return self.table[torch.cdist(x.flatten(1), self.keys).argmin(dim=1)]


class LinearModel(nn.Module):
    """``logit_k = b_k + Σ w_k · x``: a model whose logits are a known linear function of the pixels."""

    def __init__(self, weight: Tensor, bias: Tensor, is_bcos: bool = True) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.is_bcos = is_bcos

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("nchw,kchw->nk", x, self.weight) + self.bias


class ConstantModel(nn.Module):
    is_bcos = True

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1)


def confident_table(labels: Tensor, seed: int = 0, few: int = 0) -> tuple[Tensor, Tensor]:
    """Logits ``(N, 10)`` with a known outcome per image: 0 confident-correct, 1 wrong, 2 correct but
    unconfident. Class ``few`` keeps only 2 confident images (so grids must cycle through it)."""
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    kind = torch.randint(0, 3, (n,), generator=g)
    kind[labels == few] = torch.where(torch.arange(int((labels == few).sum())) < 2, 0, 1)
    logits = torch.full((n, 10), -4.0, dtype=torch.float64)
    rows = torch.arange(n)
    confident = 0.1 + 4 * torch.rand(n, generator=g, dtype=torch.float64)
    logits[rows, labels] = torch.where(kind == 0, confident, torch.where(kind == 1, 1.0, -0.5))
    wrong = (labels + 1) % 10
    logits[rows[kind == 1], wrong[kind == 1]] = 3.0  # argmax is another class, label still has sigmoid > 0.5
    return logits, kind


def expected_confident(logits: Tensor, labels: Tensor, is_bcos: bool) -> list[list[int]]:
    probs = torch.sigmoid(logits) if is_bcos else torch.softmax(logits, dim=1)
    conf = probs[torch.arange(len(labels)), labels].numpy()
    pred = logits.argmax(dim=1)
    out = []
    for k in range(10):
        idx = [i for i in range(len(labels)) if labels[i] == k and pred[i] == k and conf[i] > 0.5]
        out.append(sorted(idx, key=lambda i: (-conf[i], i)))
    return out


# --- oracle attribution methods for the pointing game: they know each cell's true class ---------------


def cell_classes(x: Tensor, grid: int, keys: Tensor, labels: Tensor) -> Tensor:
    """``(B, grid²)`` true class of each cell of grid images ``x`` ``(B, C, grid·H, grid·W)``."""
    b, c, hn, wn = x.shape
    h, w = hn // grid, wn // grid
    cells = x.reshape(b, c, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5).reshape(b * grid * grid, -1)
    return labels[torch.cdist(cells, keys.flatten(1)).argmin(dim=1)].reshape(b, grid * grid)


def cell_map(x: Tensor, grid: int, values: Tensor) -> Tensor:
    """``(B, grid²)`` per-cell values -> ``(B, grid·H, grid·W)`` piecewise-constant maps."""
    h, w = x.shape[2] // grid, x.shape[3] // grid
    v = values.reshape(-1, grid, grid).double()
    return v.repeat_interleave(h, dim=1).repeat_interleave(w, dim=2)


def oracle(keys: Tensor, labels: Tensor, grid: int, kind: str):
    def method(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        hit = cell_classes(x, grid, keys, labels) == target[:, None]
        if kind == "oracle":  # all positive mass in the right cell, negative elsewhere
            values = torch.where(hit, 1.0, -5.0)
        elif kind == "uniform":
            values = torch.ones(hit.shape)
        elif kind == "adversarial":
            values = torch.where(hit, -1.0, 2.0)
        else:  # nothing positive anywhere
            values = -torch.ones(hit.shape)
        return cell_map(x, grid, values)

    return method


@pytest.fixture(scope="module")
def stub(fmnist):
    images, labels = fmnist
    logits, kind = confident_table(labels)
    return LookupModel(images, logits), logits, kind


# --- confidence filter ------------------------------------------------------------------------------


@pytest.mark.parametrize("is_bcos", [True, False])
def test_confidence_filter_excludes_wrong_and_unconfident(fmnist, is_bcos):
    images, labels = fmnist
    logits, kind = confident_table(labels)
    model = LookupModel(images, logits, is_bcos=is_bcos)
    indices, confidences = metrics.confident_images_by_class(model, images, labels, batch_size=300)
    assert len(indices) == 10
    assert [i.tolist() for i in indices] == expected_confident(logits, labels, is_bcos)
    kept = torch.cat(indices)
    if is_bcos:  # the table was built for sigmoid confidences: exactly the "confident-correct" images remain
        assert set(kept.tolist()) == set(torch.nonzero(kind == 0).flatten().tolist())
    assert not (kind[kept] == 1).any()  # wrong predictions never pass, whatever the probability
    for idx, conf in zip(indices, confidences):
        assert (conf > 0.5).all() and (conf[:-1] >= conf[1:]).all()
        assert (labels[idx] == labels[idx[0]]).all() if len(idx) else True


def test_confidence_filter_on_real_models(fmnist, build):
    images, labels = fmnist[0][:200], fmnist[1][:200]
    for name in ("bcos_vit_nano_patch4_28", "vit_nano_patch4_28"):
        model = build(name, depth=1, embed_dim=16, num_heads=2)
        with torch.no_grad():
            logits = model(images)
        indices, _ = metrics.confident_images_by_class(model, images, labels, batch_size=64)
        assert [i.tolist() for i in indices] == expected_confident(logits, labels, model.is_bcos)


def test_confidence_filter_reuses_given_logits_without_running_the_model(fmnist):
    images, labels = fmnist
    logits, _ = confident_table(labels)
    model = LookupModel(images, logits, is_bcos=True)
    expected = metrics.confident_images_by_class(model, images, labels)
    predicted = metrics.predict_logits(model, images)
    model.forward = None  # another pass over the images would fail
    given = metrics.confident_images_by_class(model, images, labels, logits=predicted)
    assert [i.tolist() for i in given[0]] == [i.tolist() for i in expected[0]]
    with pytest.raises(InputError, match="logits of shape"):
        metrics.confident_images_by_class(model, images, labels, logits=logits[:-1])


def test_missing_is_bcos_is_a_clear_error(fmnist):
    images, labels = fmnist
    model = nn.Flatten()
    with pytest.raises(ConfigError, match="is_bcos"):
        metrics.confident_images_by_class(model, images[:4], labels[:4])


# --- grids ----------------------------------------------------------------------------------------------


def test_grids_distinct_reproducible_and_seeded(fmnist, stub):
    images, labels = fmnist
    model, _, _ = stub
    a = metrics.make_grids(model, images, labels, grid=3, num_grids=30, seed=0)
    b = metrics.make_grids(model, images, labels, grid=3, num_grids=30, seed=0)
    c = metrics.make_grids(model, images, labels, grid=3, num_grids=30, seed=1)
    first = metrics.make_grids(model, images, labels, grid=3, num_grids=4, seed=0)
    assert a.images.shape == (30, 1, 84, 84) and a.classes.shape == (30, 9)
    assert all(len(set(row.tolist())) == 9 for row in a.classes)  # distinct classes per grid
    assert (labels[a.image_indices] == a.classes).all()  # each cell holds an image of its class
    assert torch.equal(a.classes, b.classes) and torch.equal(a.image_indices, b.image_indices)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.classes, c.classes)
    assert torch.equal(first.classes, a.classes[:4]) and torch.equal(first.images, a.images[:4])


def test_assemble_grids_places_cells_row_major(fmnist):
    images, _ = fmnist
    idx = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    grids = metrics.assemble_grids(images, idx, grid=2)
    assert grids.shape == (2, 1, 56, 56)
    for g in range(2):
        for j in range(4):
            r, c = divmod(j, 2)
            assert torch.equal(grids[g, :, r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28], images[idx[g, j]])


def test_tile_grids_is_the_tiling_of_the_pointing_game_and_of_training_mosaics(fmnist):
    images = fmnist[0][:11]
    tiled = metrics.tile_grids(images[:9], grid=3)
    assert tiled.shape == (1, 1, 84, 84)
    for j in range(9):
        r, c = divmod(j, 3)
        assert torch.equal(tiled[0, :, r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28], images[j])
    idx = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    assert torch.equal(metrics.assemble_grids(images, idx, grid=2), metrics.tile_grids(images[idx.flatten()], 2))
    canvases, _ = mosaic(images, torch.eye(11), grid=2)  # the last 11 mod 4 = 3 images are dropped
    assert torch.equal(canvases, metrics.tile_grids(images[:8], grid=2))
    with pytest.raises(InputError, match="multiple of 4"):
        metrics.tile_grids(images[:6], grid=2)
    with pytest.raises(InputError, match=r"image_indices must have shape \(G, 4\)"):
        metrics.assemble_grids(images, idx.flatten(), grid=2)


def test_cells_take_most_confident_images_first_and_cycle(fmnist, stub):
    images, labels = fmnist
    model, logits, _ = stub
    indices, _ = metrics.confident_images_by_class(model, images, labels)
    assert len(indices[0]) == 2  # the "few" class must cycle
    grids = metrics.make_grids(model, images, labels, grid=2, num_grids=100, seed=3)
    for k in range(10):
        used = grids.image_indices[grids.classes == k].tolist()  # grid-major, then cell order
        assert used, f"class {k} never drawn"
        pool = indices[k].tolist()
        assert used == [pool[i % len(pool)] for i in range(len(used))]
    conf = torch.sigmoid(logits)[grids.image_indices, grids.classes]
    assert torch.allclose(grids.confidences, conf)


def test_stop_mode_never_reuses_images(fmnist, stub):
    images, labels = fmnist
    model, _, _ = stub
    indices, _ = metrics.confident_images_by_class(model, images, labels)
    classes, chosen = metrics.sample_grids(indices, grid=3, num_grids=500, seed=0, cycle=False)
    assert 0 < classes.shape[0] < 500
    assert len(set(chosen.flatten().tolist())) == chosen.numel()
    left = [len(indices[k]) - int((classes == k).sum()) for k in range(10)]
    assert sum(n > 0 for n in left) < 9  # it stopped because fewer than 9 classes had unused images


def test_too_few_classes_is_an_error():
    pools = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([], dtype=torch.long), torch.tensor([4])]
    with pytest.raises(InputError, match="distinct classes"):
        metrics.sample_grids(pools, grid=2)
    classes, _ = metrics.sample_grids(pools[:2] + pools[3:], grid=1, num_grids=5)
    assert classes.shape == (5, 1)


# --- pointing game scores ---------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [2, 3])
def test_pointing_game_oracle_uniform_adversarial(fmnist, stub, grid):
    images, labels = fmnist
    model, _, _ = stub
    play = {
        kind: metrics.grid_pointing_game(
            model, images, labels, oracle(images, labels, grid, kind), grid=grid, num_grids=12, batch_size=10
        )
        for kind in ("oracle", "uniform", "adversarial", "negative")
    }
    assert play["oracle"].scores.shape == (12, grid * grid) and play["oracle"].num_grids == 12
    assert torch.equal(play["oracle"].scores, torch.ones(12, grid * grid, dtype=torch.float64))
    assert play["oracle"].mean == 1.0
    assert torch.equal(play["uniform"].scores, torch.full((12, grid * grid), 1 / grid**2, dtype=torch.float64))
    assert play["uniform"].mean == pytest.approx(1 / grid**2, abs=1e-15)
    assert play["adversarial"].mean == 0.0 and play["negative"].mean == 0.0
    assert torch.equal(play["oracle"].classes, play["uniform"].classes)
    json.dumps(play["uniform"].to_dict())


def test_pointing_game_smoothing_and_cell_scores():
    maps = torch.zeros(3, 12, 12, dtype=torch.float64)
    maps[0, 2, 2] = 1.0  # inside cell 0, away from its borders
    maps[1, 5, 5] = 1.0  # at the corner of cell 0 (cells are 6×6)
    maps[2] = -1.0  # nothing positive
    cells = torch.tensor([0, 0, 0])
    assert metrics.grid_cell_scores(maps, cells, grid=2).tolist() == [1.0, 1.0, 0.0]
    smooth = metrics.grid_cell_scores(maps, cells, grid=2, smooth=3)
    assert smooth[0] == pytest.approx(1.0) and smooth[1] == pytest.approx(4 / 9) and smooth[2] == 0.0
    assert metrics.grid_cell_scores(maps, cells, grid=2, smooth=2).shape == (3,)


def test_pointing_game_batched_equals_one_at_a_time(fmnist, stub, build):
    images, labels = fmnist
    model, _, _ = stub
    real = build("bcos_vit_nano_patch4_28", depth=1, embed_dim=16, num_heads=2)
    sizes = []

    def method(m: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        sizes.append(x.shape[0])
        return bcosvit.explain(real, x, t).contributions[:, 0]

    runs = [
        metrics.grid_pointing_game(model, images, labels, method, num_grids=6, batch_size=b, smooth=3)
        for b in (64, 5, 1)
    ]
    assert max(sizes) <= 64 and sizes[:2] == [24, 5]
    for run in runs[1:]:
        assert torch.equal(run.classes, runs[0].classes)
        assert torch.allclose(run.scores, runs[0].scores, rtol=0, atol=1e-12)
    assert ((runs[0].scores >= 0) & (runs[0].scores <= 1)).all()
    low, high = runs[0].ci95
    assert low <= runs[0].mean <= high


def test_pointing_game_rejects_bad_maps(fmnist, stub):
    images, labels = fmnist
    model, _, _ = stub
    with pytest.raises(InputError, match="shape"):
        metrics.grid_pointing_game(model, images, labels, lambda m, x, t: x[:, 0, :5], num_grids=2)


# --- deletion / insertion ---------------------------------------------------------------------------


def linear_setup(fmnist, n: int = 6, classes: int = 1, is_bcos: bool = True):
    images = fmnist[0][:n]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(classes, 1, 28, 28, generator=g, dtype=torch.float64) * 0.05
    bias = torch.randn(classes, generator=g, dtype=torch.float64)
    return images, LinearModel(weight, bias, is_bcos), weight, bias


def test_deletion_insertion_oracle_on_linear_model_is_analytic(fmnist):
    images, model, weight, bias = linear_setup(fmnist)
    target = torch.zeros(len(images), dtype=torch.long)
    contrib = (weight[0] * images).sum(dim=1)  # (N, H, W): the exact attribution of the logit
    steps, pixels = 16, 784  # 784 / 16 = 49 pixels per step
    dele = metrics.deletion_insertion(model, images, target, contrib, steps=steps, mode="deletion", batch_size=10)
    ins = metrics.deletion_insertion(model, images, target, contrib, steps=steps, mode="insertion", batch_size=10)
    ordered = contrib.flatten(1).sort(dim=1, descending=True).values
    cum = torch.cat([torch.zeros(len(images), 1, dtype=torch.float64), ordered.cumsum(dim=1)], dim=1)
    counts = torch.arange(steps + 1) * pixels // steps
    total = contrib.flatten(1).sum(dim=1, keepdim=True)
    assert torch.allclose(dele.scores, torch.sigmoid(bias + total - cum[:, counts]), atol=1e-12)
    assert torch.allclose(ins.scores, torch.sigmoid(bias + cum[:, counts]), atol=1e-12)
    assert torch.allclose(dele.fractions, torch.linspace(0, 1, steps + 1, dtype=torch.float64))
    # deleting the most relevant pixels first is the steepest drop: never above the reversed order
    anti = metrics.deletion_insertion(model, images, target, -contrib, steps=steps, mode="deletion")
    assert (dele.scores <= anti.scores + 1e-12).all() and (dele.auc < anti.auc).all()
    anti_ins = metrics.deletion_insertion(model, images, target, -contrib, steps=steps, mode="insertion")
    assert (ins.auc > anti_ins.auc).all()
    json.dumps(dele.to_dict(include_scores=True))


def test_deletion_softmax_baseline_and_ties(fmnist):
    images, model, weight, bias = linear_setup(fmnist, classes=2, is_bcos=False)
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    steps, base = 7, 0.5  # 784 / 7 = 112
    attributions = torch.zeros(len(images), 28, 28)  # all tied: row-major order
    attributions[:, 27, 27] = 1.0  # ...except the last pixel, which goes first
    result = metrics.deletion_insertion(model, images, target, attributions, steps=steps, baseline=base)
    order = np.argsort(-attributions.flatten(1).numpy(), axis=1, kind="stable")
    assert (order[:, 0] == 783).all() and (order[:, 1:] == np.arange(783)).all()
    diff_w = (weight[target] - weight[1 - target]).flatten(1)  # logit difference: softmax = sigmoid(diff)
    diff_b = bias[target] - bias[1 - target]
    x = images.flatten(1)
    for k in range(steps + 1):
        removed = torch.as_tensor(order[:, : k * 784 // steps])
        xk = x.clone().scatter_(1, removed, base)
        expected = torch.sigmoid(diff_b + (diff_w * xk).sum(dim=1))
        assert torch.allclose(result.scores[:, k], expected, atol=1e-12)


@pytest.mark.parametrize("name", ["bcos_vit_nano_patch4_28", "vit_nano_patch4_28"])
def test_curve_endpoints_and_batching_on_real_model(fmnist, build, name):
    model = build(name, depth=1, embed_dim=16, num_heads=2)
    images, target = fmnist[0][:9], fmnist[1][:9]
    attributions = torch.rand(9, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        probs = metrics.target_probabilities(model(images), target, model.is_bcos)
        empty = metrics.target_probabilities(model(torch.zeros_like(images)), target, model.is_bcos)
    runs = {}
    for mode in ("deletion", "insertion"):
        runs[mode] = metrics.deletion_insertion(model, images, target, attributions, steps=5, mode=mode, batch_size=7)
        assert runs[mode].scores.shape == (9, 6) and runs[mode].auc.shape == (9,)
    assert torch.allclose(runs["deletion"].scores[:, 0], probs, rtol=0, atol=1e-12)
    assert torch.allclose(runs["insertion"].scores[:, -1], probs, rtol=0, atol=1e-12)
    assert torch.allclose(runs["deletion"].scores[:, -1], empty, rtol=0, atol=1e-12)
    assert torch.allclose(runs["insertion"].scores[:, 0], empty, rtol=0, atol=1e-12)
    whole = metrics.deletion_insertion(model, images, target, attributions, steps=5, batch_size=1000)
    single = [
        metrics.deletion_insertion(model, images[i : i + 1], target[i : i + 1], attributions[i : i + 1], steps=5)
        for i in range(9)
    ]
    one_by_one = torch.cat([s.scores for s in single])
    assert torch.allclose(whole.scores, runs["deletion"].scores, rtol=0, atol=1e-12)
    assert torch.allclose(one_by_one, whole.scores, rtol=0, atol=1e-12)
    assert whole.mean_auc == pytest.approx(float(whole.auc.mean()))
    assert torch.allclose(whole.mean_curve, whole.scores.mean(dim=0))


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_steps_that_only_touch_pixels_at_the_baseline_are_copied_not_recomputed(fmnist, build, mode):
    model = build("bcos_vit_nano_patch4_28", depth=1, embed_dim=16, num_heads=2)
    images, target = fmnist[0][:4].clone(), fmnist[1][:4]
    images[:, :, 14:] = 0  # the bottom half is at the baseline...
    attributions = torch.rand(4, 28, 28, dtype=torch.float64)
    attributions[:, 14:] -= 2  # ...and ranked last, so the last half of the steps changes nothing
    attributions[1] = torch.rand(28, 28)  # except for one image, which mixes both halves
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    steps = 8
    result = metrics.deletion_insertion(model, images, target, attributions, steps=steps, mode=mode)

    order = attributions.flatten(1).argsort(dim=1, descending=True, stable=True)
    with torch.no_grad():
        for k in range(steps + 1):
            top = torch.zeros(4, 784, dtype=torch.bool).scatter_(1, order[:, : k * 784 // steps], True)
            top = top.reshape(4, 1, 28, 28)
            x = torch.where(top, 0.0, images) if mode == "deletion" else torch.where(top, images, 0.0)
            expected = metrics.target_probabilities(model(x), target, True)
            torch.testing.assert_close(result.scores[:, k], expected.double(), rtol=0, atol=1e-12)
    seen.clear()
    metrics.deletion_insertion(model, images, target, attributions, steps=steps, mode=mode)
    assert sum(seen) - 1 < 4 * steps - 3 * 3, "the constant image, then fewer than one image per step"


def test_auc_of_constant_curve_is_the_constant(fmnist):
    images, target = fmnist[0][:4], fmnist[1][:4]
    logits = torch.linspace(-2, 2, 10, dtype=torch.float64)
    model = ConstantModel(logits)
    result = metrics.deletion_insertion(model, images, target, torch.rand(4, 28, 28), steps=13)
    constant = torch.sigmoid(logits[target])
    assert torch.equal(result.scores, constant[:, None].expand(4, 14))
    assert torch.allclose(result.auc, constant, rtol=1e-14, atol=0)


def test_compute_attributions_and_errors(fmnist, build):
    model = build("bcos_vit_nano_patch4_28", depth=1, embed_dim=16, num_heads=2)
    images, target = fmnist[0][:5], fmnist[1][:5]

    def method(m, x, t):
        return bcosvit.explain(m, x, t).contributions[:, 0]

    maps = metrics.compute_attributions(model, images, target, method, batch_size=2)
    assert torch.allclose(maps, method(model, images, target), atol=1e-12)
    with pytest.raises(ConfigError, match="mode"):
        metrics.deletion_insertion(model, images, target, maps, mode="both")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="shape"):
        metrics.deletion_insertion(model, images, target, maps[:, :5])
    with pytest.raises(InputError, match="NaN"):
        metrics.deletion_insertion(model, images, target, maps * math.nan)


# --- statistics -----------------------------------------------------------------------------------------


def test_mean_ci95_contains_mean_and_shrinks():
    mean, low, high = metrics.mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5
    half = 1.959963984540054 * math.sqrt(5 / 3) / 2
    assert low == pytest.approx(2.5 - half) and high == pytest.approx(2.5 + half)
    g = torch.Generator().manual_seed(0)
    values = torch.rand(10_000, generator=g, dtype=torch.float64)
    widths = []
    for n in (10, 100, 10_000):
        m, lo, hi = metrics.mean_ci95(values[:n])
        assert lo < m < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] / widths[2] == pytest.approx(10, rel=0.2)
    single = metrics.mean_ci95([0.3])
    assert single[0] == 0.3 and math.isnan(single[1]) and math.isnan(single[2])
    with pytest.raises(InputError):
        metrics.mean_ci95(torch.tensor([]))


def test_completeness_stats(tiny):
    stats = metrics.completeness_stats(torch.tensor([-1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.0, -6.0, 0.0]))
    assert stats.count == 4
    assert stats.absolute.mean == 2.5 and stats.absolute.median == 2.5 and stats.absolute.max == 4.0
    assert stats.absolute.p99 == pytest.approx(3.97)
    assert stats.relative.median == 0.5 and stats.relative.max == pytest.approx(4e12)
    keys = [f"{kind}_{stat}" for kind in ("abs", "rel") for stat in ("mean", "median", "max", "p99")]
    assert list(stats.to_dict()) == ["count", *keys]
    assert stats.to_dict()["count"] == 4.0 and stats.to_dict()["rel_median"] == 0.5
    alone = metrics.completeness_stats(torch.tensor([1.0]))
    assert alone.relative is None and "rel_mean" not in alone.to_dict()
    expl = bcosvit.explain(tiny, torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6))
    real = metrics.completeness_stats(expl.completeness_error, expl.outputs)
    assert real.absolute.max < 1e-9 and real.absolute.p99 <= real.absolute.max
    json.dumps(real.to_dict())


def test_topk_accuracy_on_a_known_example_and_summed_over_batches():
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 0],  # label 0: top-1
            [9.0, 8, 7, 6, 5, 4, 0],  # label 4: fifth highest, top-5 only
            [9.0, 8, 7, 6, 5, 4, 0],  # label 5: sixth highest, neither
            [0.0, 1, 2, 3, 4, 5, 6],  # label 6: top-1
        ]
    )
    labels = torch.tensor([0, 4, 5, 6])
    accuracy = metrics.topk_accuracy(logits, labels)
    assert accuracy == metrics.TopkAccuracy(top1_hits=2, top5_hits=3, total=4)
    assert accuracy.to_dict() == {"top1": 50.0, "top5": 75.0}
    parts = [metrics.topk_accuracy(logits[i : i + 1], labels[i : i + 1]) for i in range(4)]
    assert sum(parts, metrics.TopkAccuracy()) == accuracy
    three = metrics.topk_accuracy(logits[:, :3], torch.tensor([2, 1, 1, 2]))  # fewer than 5 classes: all count
    assert three.top1 == 25.0 and three.top5 == 100.0
    assert metrics.topk_accuracy(logits[:3], labels[:3]).top1 == 100.0 * (1 / 3)  # percent of the fraction


def test_training_evaluation_reports_the_library_topk_accuracy(fmnist, build):
    model = build("bcos_vit_nano_patch4_28", dtype=torch.float32, depth=1, embed_dim=16, num_heads=2)
    images, labels = fmnist[0][:70].float(), fmnist[1][:70]
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)  # batches of 16, 16, 16, 16 and 6
    result = evaluate(model, loader, TrainConfig(precision="fp32"), torch.device("cpu"))
    with torch.no_grad():
        expected = metrics.topk_accuracy(model(images), labels)
    assert (result["test_top1"], result["test_top5"]) == (expected.top1, expected.top5)
    assert 0 < expected.top1 < 100  # an untrained model: some right, some wrong
