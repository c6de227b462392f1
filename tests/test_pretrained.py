"""The weights shipped inside the package load offline and keep their accuracy on real data."""

from pathlib import Path

import pytest
import torch

import bcosvit
from bcosvit.app.data import load_fashion_mnist
from bcosvit.metrics import predict_logits, topk_accuracy

SHIPPED = ("bcos_vitc_micro_28", "vitc_micro_28")


@pytest.fixture(scope="module")
def test_subset():
    ds = load_fashion_mnist("test", Path(__file__).parent / "data" / "fashion-mnist")  # the first 1000 real test images
    return ds.images.float() / 255, ds.labels


def test_the_shipped_pair_is_listed():
    assert set(SHIPPED) <= set(bcosvit.list_pretrained())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_accuracy_on_the_committed_test_subset(name, test_subset):
    model = bcosvit.create_model(name, pretrained=True)
    assert model.config.class_names[9] == "Ankle boot"
    images, labels = test_subset
    accuracy = topk_accuracy(predict_logits(model, images), labels)
    # Full 10k test set: see docs/results.md (target >= 92% for the B-cos model).
    assert accuracy.top1 >= 90.0, accuracy


def test_shipped_bcos_explanations_are_complete_on_real_images(test_subset):
    model = bcosvit.create_model("bcos_vitc_micro_28", pretrained=True)
    images, labels = test_subset
    e = bcosvit.explain(model, images[:64], target=labels[:64])
    assert float(e.completeness_error.max()) < 1e-4
    if model.pos_embed is not None:  # an added embedding: its share is reported, not dropped
        assert float(e.positional.abs().max()) > 0
    else:  # RoPE acts inside attention, so the whole logit is w(x)·x + bias
        assert float(e.positional.abs().max()) == 0


def test_shipped_weights_can_start_a_model_with_another_head():
    model = bcosvit.create_model("bcos_vitc_micro_28", pretrained=True, num_classes=3)
    assert model.num_classes == 3 and model(torch.rand(2, 1, 28, 28)).shape == (2, 3)
