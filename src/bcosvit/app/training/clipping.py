"""Adaptive (unit-wise) gradient clipping (Brock et al. 2021): what ``clip = "agc"`` does, the choice of
"auto" for B-cos models.

The parameters are clipped in groups of one shape: each group's weights and gradients are stacked
once, their unit norms taken in one reduction and the scaled gradients copied back with one
``torch._foreach_copy_``, a few kernels per shape instead of several per parameter (a ViT has
about a dozen shapes for its hundreds of parameters)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn

# At most this many elements are stacked at once (4 MB in float32): the copies stay small however
# large a model's groups of equal shape are, and a tensor this large is clipped on its own, where a
# kernel launch costs little next to its memory traffic. (On a CPU, whose launches are cheap anyway,
# stacks of whole groups were 2-4x slower to allocate and fill than these.)
STACK_ELEMENTS = 2**20


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[nn.Parameter], clip: float = 0.01, eps: float = 1e-3) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021): scale each unit's gradient down to
    at most ``clip * max(||W_unit||, eps)``. A unit is an output row (index 0) of a weight of two
    or more dimensions, the whole tensor for a vector or scalar."""
    for group in _groups_of_one_shape(parameters):
        _clip_group_(group, clip, eps)


def _groups_of_one_shape(parameters: Iterable[nn.Parameter]) -> list[list[nn.Parameter]]:
    """The parameters with a gradient, grouped by shape, dtype and device, each group cut into
    chunks of at most ``STACK_ELEMENTS`` elements."""
    groups: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            groups[p.shape, p.dtype, p.grad.dtype, p.device].append(p)
    chunks = []
    for group in groups.values():
        size = max(1, STACK_ELEMENTS // max(1, group[0].numel()))
        chunks += [group[i : i + size] for i in range(0, len(group), size)]
    return chunks


def _unit_rows(tensors: list[Tensor]) -> Tensor:
    """``G`` tensors of one shape stacked as ``(G, units, elements per unit)``."""
    shape = tensors[0].shape
    units = shape[0] if len(shape) > 1 else 1
    return torch.stack(tensors).view(len(tensors), units, -1)


def _clip_group_(params: list[nn.Parameter], clip: float, eps: float) -> None:
    """Clip the gradients of ``params`` (one shape) in place."""
    grads = [p.grad for p in params]
    weight_norms = _unit_rows(params).norm(dim=2, keepdim=True)  # (G, units, 1)
    stacked_grads = _unit_rows(grads)
    max_norms = weight_norms.clamp_min(eps) * clip
    scales = (max_norms / stacked_grads.norm(dim=2, keepdim=True).clamp_min(1e-6)).clamp(max=1.0)
    clipped = stacked_grads.mul_(scales).view(len(grads), *grads[0].shape)
    torch._foreach_copy_(grads, list(clipped.unbind(0)))
