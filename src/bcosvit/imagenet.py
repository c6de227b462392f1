"""ImageNet-1k's class names in class-index order (placeholder until the shipped class list lands)."""

from __future__ import annotations


def imagenet_class_names() -> list[str]:
    """The 1000 readable class names, in class-index order."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)
