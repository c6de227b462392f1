"""Aligning a B-cos student to a frozen teacher without labels (ALOE, "Align Once to Explain",
Maser, Gairola, Rao, Schiele, CVPR 2026).

The loss is the cosine distance ``mean over tokens of (1 - cos(student, teacher))`` at the depths
``floor(L/3), floor(2L/3), L`` of each network (L its number of blocks; ALOEv2 includes the last
block), plus that of the pooled features (``forward_head(tokens, pre_logits=True)``), each with
weight 1. A student of another width reaches the teacher's through one learned linear projection
per aligned feature, trained with it and discarded afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...models.vit import Capture, VisionTransformer
from .losses import cosine_distance
from .teacher import frozen


def aligned_depths(depth: int) -> tuple[int, int, int]:
    """The token layers aligned in a network of ``depth`` blocks: ``(L//3, 2L//3, L)`` (0: the
    embedded tokens, ``k``: after block ``k``)."""
    return depth // 3, 2 * depth // 3, depth


class AlignmentNet(nn.Module):
    """Student, frozen teacher and projections; ``forward(images)`` is the alignment loss.

    One module, so that DistributedDataParallel averages the projections' gradients with the
    student's. The student's head is not part of the loss and is frozen here (it keeps its weights).
    """

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer) -> None:
        super().__init__()
        _check_same_tokens(student, teacher)
        self.student = student
        self.teacher = frozen(teacher)
        for param in student.head.parameters():
            param.requires_grad_(False)
        self.student_layers = aligned_depths(student.config.depth)
        self.teacher_layers = aligned_depths(teacher.config.depth)
        width, teacher_width = student.embed_dim, teacher.embed_dim
        count = len(self.student_layers) + 1  # and the pooled features
        project = (lambda: nn.Linear(width, teacher_width)) if width != teacher_width else nn.Identity
        self.projections = nn.ModuleList(project() for _ in range(count))

    def train(self, mode: bool = True) -> AlignmentNet:
        super().train(mode)
        self.teacher.eval()  # frozen: always its inference behaviour
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` in [0, 1] -> the summed cosine distances, a scalar."""
        student = self._features(self.student, self.student_layers, images)
        with torch.no_grad():
            teacher = self._features(self.teacher, self.teacher_layers, images)
        return sum(cosine_distance(p(s), t) for p, s, t in zip(self.projections, student, teacher, strict=True))

    @staticmethod
    def _features(model: VisionTransformer, layers: tuple[int, ...], images: Tensor) -> list[Tensor]:
        """The patch tokens ``(N, rows·cols, D)`` at ``layers``, then the pooled features ``(N, D)``
        (no pixel-range check: the loader's images are in range, and the check waits for the device)."""
        _, record = model(images, capture=Capture(layers=layers), check=False)
        patches = [record.tokens[k][:, model.num_prefix_tokens :] for k in layers]
        return [*patches, model.forward_head(record.tokens[layers[-1]], pre_logits=True)]


def _check_same_tokens(student: VisionTransformer, teacher: VisionTransformer) -> None:
    """Raise ``ConfigError`` unless both networks see the same images as the same patch-token grid."""

    def grid(model: VisionTransformer) -> tuple[int, ...]:
        tokens = model.image_size // model.patch_size
        return model.in_chans, model.image_size, tokens

    if grid(student) != grid(teacher):
        raise ConfigError(
            f"the student reads (channels, size, tokens per side) {grid(student)} and the teacher {grid(teacher)}; "
            "alignment compares their patch tokens one to one: choose a student of the teacher's input and grid"
        )
