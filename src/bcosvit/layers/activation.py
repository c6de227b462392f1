"""A GELU whose gate detaches in explanation mode: ``GELU(x) = Φ(x) · x`` read as a dynamic linear map.

B-cos models need no activation (B supplies the non-linearity). B-cosified models (Arya et al.
2024, ``MyGELU`` in their code) keep the standard model's GELU so that the converted network starts
as the original function; with the gate ``Φ(x)`` (the standard normal CDF) treated as a constant in
explanation mode, the GELU is one more dynamic linear factor and explanations stay exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .detach import DetachableModule


class DynamicGELU(DetachableModule):
    """``(...) -> (...)``: the exact GELU; in explanation mode ``x · Φ(x)`` with ``Φ(x)`` detached."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.detach:
            return F.gelu(x)
        with torch.no_grad():
            gate = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        return x * gate
