"""Targets: one normalisation (``bcosvit.targets``) behind explanations, attributions and metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import bcosvit
from bcosvit import metrics
from bcosvit.attribution import attribute
from bcosvit.errors import InputError
from bcosvit.targets import TopK, normalize_target, required_classes, resolve_target, target_columns

NAMES = ["cat", "Dog", "bird"]


def test_every_form_becomes_a_long_tensor_of_indices():
    default = torch.tensor([2, 0])
    assert normalize_target(None, default, 3).tolist() == [2, 0]
    assert normalize_target(1, default, 3).tolist() == [1, 1]
    assert normalize_target(torch.tensor(2), default, 3).tolist() == [2, 2]
    assert normalize_target(["dog", "2"], default, 3, class_names=NAMES).tolist() == [1, 2]
    assert normalize_target([[0, "Bird"], [1, 1]], default, 3, class_names=NAMES).tolist() == [[0, 2], [1, 1]]
    t = normalize_target((0, 1), default, 3)
    assert t.dtype == torch.long and t.device == default.device
    assert resolve_target("CAT", NAMES, 3) == 0 and resolve_target(2, None, 3) == 2


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ([0.0, 1.0], {}, "class targets must be integers, got dtype torch.float32"),
        ([[0, 1, 2]], {}, r"target must be an int, a sequence of 2 classes \(one per image\)"),
        (torch.zeros(2, 0, dtype=torch.long), {}, "names no classes"),
        ([0, 3], {}, r"class targets must lie in \[0, 2\], got values \[0, 3\]"),
        ([[0, 1], [1, 2]], {"per_image": True}, r"one class per image: target must have shape \(2,\), got \(2, 2\)"),
        ("fish", {"class_names": NAMES}, "unknown class 'fish'"),
        ("fish", {}, "is a class name, but this model has no class names"),
        ([1, 2, 0], {"name": "labels"}, "labels must be an int, a sequence of 2 classes"),
    ],
)
def test_invalid_targets_are_refused_with_the_reason(target, options, message):
    with pytest.raises(InputError, match=message):
        normalize_target(target, torch.zeros(2, dtype=torch.long), 3, **options)


def test_without_a_number_of_outputs_neither_range_nor_names_are_checked():
    assert normalize_target([7, 9], torch.zeros(2, dtype=torch.long), None).tolist() == [7, 9]
    with pytest.raises(InputError, match="class targets must be integers"):
        normalize_target(["dog", "cat"], torch.zeros(2, dtype=torch.long), None, class_names=NAMES)


def test_required_classes_refuse_none_and_give_one_class_per_image_on_the_cpu():
    assert required_classes(4, 3).tolist() == [4, 4, 4]
    assert required_classes(torch.tensor([1, 2]), 2).device.type == "cpu"
    with pytest.raises(InputError, match="labels is required"):
        required_classes(None, 2, "labels")
    with pytest.raises(InputError, match=r"one class per image: target must have shape \(2,\)"):
        required_classes([[1, 2], [0, 1]], 2)


def test_explanations_attributions_and_metrics_refuse_a_target_alike(tiny, images):
    x = images(2, 1, 8)
    calls = {
        "explain": lambda t: bcosvit.explain(tiny, x, t),
        "attribute": lambda t: attribute("gradient", tiny, x, t),
        "deletion_insertion": lambda t: metrics.deletion_insertion(tiny, x, t, torch.rand(2, 8, 8)),
        "compute_attributions": lambda t: metrics.compute_attributions(tiny, x, t, lambda m, i, c: i[:, 0]),
    }
    for call in calls.values():
        with pytest.raises(InputError, match=r"^class targets must be integers, got dtype torch.float32$"):
            call(torch.tensor([1.0, 2.0]))
        with pytest.raises(InputError, match=r"^target must be an int, a sequence of 2 classes"):
            call([1, 2, 3])
    for call in (calls["attribute"], calls["deletion_insertion"]):
        with pytest.raises(InputError, match=r"^one class per image: target must have shape \(2,\), got \(2, 2\)$"):
            call([[1, 2], [3, 4]])


def test_target_columns_always_keep_the_target_axis():
    scores = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 5.0]])
    assert target_columns(None, scores).tolist() == [[1], [2]]
    assert target_columns(2, scores).tolist() == [[2], [2]]
    assert target_columns("bird", scores, class_names=NAMES).tolist() == [[2], [2]]
    assert target_columns([0, 1], scores).tolist() == [[0], [1]]
    assert target_columns(torch.tensor([[0, 1], [2, 2]]), scores).tolist() == [[0, 1], [2, 2]]
    assert target_columns(TopK(2), scores).tolist() == [[1, 2], [2, 0]]
    assert target_columns(TopK(3), scores, "channel").tolist() == [[1, 2, 0], [2, 0, 1]]


@pytest.mark.parametrize("k", [0, -2, 1.5, True, "2", None, [2]])
def test_topk_needs_a_whole_number_of_at_least_one(k):
    with pytest.raises(InputError, match=r"TopK needs a whole number k >= 1 \(how many classes per image\), got"):
        TopK(k)


def test_topk_is_a_frozen_value_and_takes_numpy_integers():
    top = TopK(np.int64(3))
    assert top == TopK(3) and type(top.k) is int and hash(top) == hash(TopK(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        top.k = 4
    assert bcosvit.TopK is TopK and "TopK" in bcosvit.__all__
    with pytest.raises(InputError, match=r"TopK\(4\) asks for 4 classes per image, but there are only 3"):
        target_columns(TopK(4), torch.zeros(2, 3))


def test_functions_of_one_class_per_image_refuse_topk_saying_which_take_it(tiny, images):
    x = images(2, 1, 8)
    message = r"^target=TopK\(k=2\) is not accepted here: top-k targets are taken by bcosvit.explain and "
    with pytest.raises(InputError, match=message):
        attribute("gradient", tiny, x, TopK(2))
    with pytest.raises(InputError, match=message):
        metrics.deletion_insertion(tiny, x, TopK(2), torch.rand(2, 8, 8))
    with pytest.raises(InputError, match=r"token=TopK\(k=1\) is not accepted here: .* give the tokens explicitly"):
        bcosvit.explain_unit(tiny, x, 1, TopK(1), 0)


def test_an_unknown_class_name_suggests_the_closest_few_instead_of_listing_a_thousand():
    from bcosvit.targets import resolve_target
    from bcosvit.weights.imagenet import imagenet_class_names

    with pytest.raises(InputError) as caught:
        resolve_target("tabby cat", imagenet_class_names(), 1000)
    message = str(caught.value)
    assert "did you mean 'tabby'" in message and "'tiger cat'" in message and len(message) < 250
