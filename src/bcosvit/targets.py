"""What to explain or measure: targets given as class names, indices, sequences or tensors, turned into
long tensors of indices, one place for every function of the library that takes them.

A target is an int (the same class for every image), a class name (``str``; looked up in the
model's ``config.class_names``), a sequence of one per image, an ``(N, T)`` tensor (or nested
lists) of ``T`` per image, or ``TopK(k)``: each image's ``k`` most likely classes, picked from the
logits of the forward pass that is explained. Intermediate explanations name tokens and channels
the same way.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["TargetLike", "TopK", "normalize_target", "required_classes", "resolve_target", "target_columns"]

_PLURAL = {"class": "classes", "token": "tokens", "channel": "channels"}


@dataclass(frozen=True)
class TopK:
    """Each image's ``k`` most likely classes, largest logit first: ``explain(model, images, TopK(2))``.

    The classes are picked from the logits of the same forward pass that is explained (no extra
    forward). ``explain``, ``token_contributions`` and ``explain_unit`` (``channel=TopK(k)``: the
    token's ``k`` largest channels) take it; their results have ``T = k`` targets per image.

    Raises ``InputError`` unless ``k`` is an int >= 1.
    """

    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or self.k < 1:
            raise InputError(f"TopK needs a whole number k >= 1 (how many classes per image), got {self.k!r}")
        object.__setattr__(self, "k", int(self.k))

    def indices(self, scores: Tensor, what: str = "class") -> Tensor:
        """``(N, k)`` long indices of the ``k`` largest of ``scores`` ``(N, K)`` per row, largest first;
        ``InputError`` when ``k > K``."""
        if self.k > scores.shape[1]:
            raise InputError(
                f"TopK({self.k}) asks for {self.k} {_PLURAL[what]} per image, but there are only {scores.shape[1]}"
            )
        return scores.detach().topk(self.k, dim=1).indices


TargetLike = int | str | Sequence[int | str] | Sequence[Sequence[int | str]] | Tensor | TopK | None


def _closest_classes(name: str, class_names: Sequence[str], shown: int = 5) -> str:
    """A "did you mean ...?" with the closest few class names (those sharing a word with ``name``
    first, then by similarity), or the whole list when it is short."""
    if len(class_names) <= 20:
        return f"classes: {list(class_names)}"
    words = set(name.lower().split())

    def rank(candidate: str) -> tuple[bool, float]:
        shares_word = bool(words & set(candidate.lower().split()))
        return not shares_word, -difflib.SequenceMatcher(None, name.lower(), candidate.lower()).ratio()

    suggestions = [c for c in sorted(dict.fromkeys(class_names), key=rank) if rank(c)[1] <= -0.5 or not rank(c)[0]]
    listed = f"did you mean {', '.join(map(repr, suggestions[:shown]))}? " if suggestions else ""
    return f"{listed}(the model has {len(class_names)} classes; an index in [0, {len(class_names) - 1}] works too)"


def resolve_target(target: str | int, class_names: Sequence[str] | None, num_classes: int) -> int:
    """A class index from a class name (case-insensitive) or an index (an int or a string of digits)."""
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        lookup = {name.lower(): i for i, name in enumerate(class_names or [])}
        if not class_names:
            raise InputError(
                f"target {target!r} is a class name, but this model has no class names (config.class_names is "
                f"None); give class indices in [0, {num_classes - 1}]"
            )
        if target.lower() not in lookup:
            raise InputError(f"unknown class {target!r}; {_closest_classes(target, class_names)}")
        return lookup[target.lower()]
    index = int(target)
    if not 0 <= index < num_classes:
        raise InputError(f"class index {index} out of range [0, {num_classes - 1}]")
    return index


def _class_names_to_indices(target: Any, class_names: Sequence[str] | None, num_classes: int) -> Any:
    """``target`` with every class name (a str, also inside lists and tuples) replaced by its index."""
    if isinstance(target, str):
        return resolve_target(target, class_names, num_classes)
    if isinstance(target, (list, tuple)):
        return [_class_names_to_indices(t, class_names, num_classes) for t in target]
    return target


def normalize_target(
    target: TargetLike,
    default: Tensor,
    num_outputs: int | None,
    what: str = "class",
    class_names: Sequence[str] | None = None,
    *,
    per_image: bool = False,
    name: str = "target",
) -> Tensor:
    """Turn ``target`` into a long tensor ``(N,)`` or ``(N, T)`` on the device of ``default``.

    Args:
        default: ``(N,)`` returned for None; its length is the number of images N.
        num_outputs: the targets must lie in ``[0, num_outputs)``; None: not checked, and class
            names are not looked up (the number of classes is unknown).
        what: "class", "token" or "channel", for the messages; class names (``str``, alone or in
            lists) are looked up in ``class_names`` for "class".
        per_image: exactly one target per image: ``(N,)``, never ``(N, T)``.
        name: the argument's name in the messages.
    """
    n = default.shape[0]
    if target is None:
        return default
    if isinstance(target, TopK):
        raise InputError(
            f"{name}={target!r} is not accepted here: top-k targets are taken by bcosvit.explain and "
            f"token_contributions (classes) and explain_unit (channels); give the {_PLURAL[what]} explicitly"
        )
    if what == "class" and num_outputs is not None:
        target = _class_names_to_indices(target, class_names, num_outputs)
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long)
    else:
        try:
            t = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"{what} targets must be integers: an int, a sequence or an (N, T) tensor; got {target!r} ({exc})"
            ) from None
        if t.is_floating_point():
            raise InputError(f"{what} targets must be integers, got dtype {t.dtype}")
        t = t.long()
        if t.ndim == 0:
            t = t.expand(n)
        elif t.ndim > 2 or t.shape[0] != n:
            raise InputError(
                f"{name} must be an int, a sequence of {n} {_PLURAL[what]} (one per image) or a tensor of shape "
                f"({n}, T); got shape {tuple(t.shape)}"
            )
        elif t.ndim == 2 and t.shape[1] == 0:
            raise InputError(f"{name} of shape {tuple(t.shape)} names no {_PLURAL[what]}; give at least one per image")
    if per_image and t.ndim != 1:
        raise InputError(f"one {what} per image: {name} must have shape ({n},), got {tuple(t.shape)}")
    if num_outputs is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_outputs):
        raise InputError(f"{what} targets must lie in [0, {num_outputs - 1}], got values {t.unique().tolist()[:10]}")
    return t.to(default.device)


def target_columns(
    target: TargetLike,
    scores: Tensor,
    what: str = "class",
    class_names: Sequence[str] | None = None,
) -> Tensor:
    """``target`` as a long tensor ``(N, T)`` of ``T`` targets per image, on the device of ``scores``.

    Every form keeps the target axis: None (the largest of ``scores``), an int, a name or one target
    per image give ``T = 1``; an ``(N, T)`` tensor gives its ``T``; ``TopK(k)`` gives each row's ``k``
    largest ``scores`` (``T = k``, largest first).

    Args:
        scores: ``(N, K)`` the values the targets index (logits, or a token's channels), detached here.
        what, class_names: as in ``normalize_target`` (names are looked up for "class").
    """
    if isinstance(target, TopK):
        return target.indices(scores, what)
    default = scores.detach().argmax(dim=1)
    columns = normalize_target(target, default, scores.shape[1], what, class_names)
    return columns if columns.ndim == 2 else columns[:, None]


def required_classes(target: TargetLike, n: int, name: str = "target") -> Tensor:
    """``(N,)`` long class indices on the CPU, one per image of ``n`` (an int: the same for every image),
    for functions that have no default class: None raises ``InputError``, as does any other form
    ``normalize_target`` refuses. The range is not checked (the caller knows the number of classes)."""
    if target is None:
        raise InputError(f"{name} is required: one class per image")
    return normalize_target(target, torch.zeros(n, dtype=torch.long), None, per_image=True, name=name)
