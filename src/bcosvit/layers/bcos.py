"""B-cos linear and convolution layers (docs/design.md#b-cos-transform).

    B-cos(x; w) = |cos(x, ŵ)|^(B-1) · (ŵᵀx),   ŵ = w / ||w||,   cos(x, ŵ) = ŵᵀx / ||x||

No bias; raw weights are stored and normalised on every forward pass. In explanation mode the
factor ``|cos|^(B-1)`` is detached, so the layer is the linear map ``x -> |cos|^(B-1) ŵᵀx``.

Numerical guards, the reference implementation's (``bcos`` 0.1.3): the linear layer (and a 1×1
convolution, a linear layer at each position) uses ``||x|| + LINEAR_NORM_EPS``, a convolution
``sqrt(sum x² + NORM_EPS)`` over each window; for
non-integer ``B`` the cosine is clamped at ``COS_EPS`` before the power so its gradient stays
finite. All sit inside the detached factor, so they never break completeness.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detach import DetachableModule

NORM_EPS = 1e-6
LINEAR_NORM_EPS = 1e-12
COS_EPS = 1e-6
WEIGHT_NORM_EPS = 1e-12  # F.normalize's


class _SquareCosScale(torch.autograd.Function):
    """``out = lin · |lin| / norm`` (the B = 2 factor) with a hand-written backward.

    Autograd's generic graph for this expression takes about a dozen element-wise passes over the
    ``(rows, out_features)`` tensor; this takes three forward and four backward, which is what
    keeps a B-cos training step close to the cost of an ordinary ViT's on a CPU. When a graph of
    the backward pass itself is requested (second derivatives), the backward is written with
    differentiable, out-of-place operations instead.
    """

    @staticmethod
    def forward(ctx, lin: Tensor, norm: Tensor, dim: int) -> Tensor:
        factor = _abs_cos(lin, norm)
        ctx.save_for_backward(lin, factor, norm)
        ctx.dim = dim
        return lin * factor

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        lin, factor, norm = ctx.saved_tensors
        # d out / d lin = 2 |lin| / norm;  d out / d norm = -lin·|lin| / norm² = -(grad_lin · lin) / (2 norm)
        if torch.is_grad_enabled():  # create_graph=True: keep every step differentiable
            grad_lin = 2 * grad * (lin.abs() / norm)
            grad_norm = -(grad_lin * lin).sum(dim=ctx.dim, keepdim=True) / (2 * norm)
        else:
            grad_lin = (grad * factor).mul_(2)
            grad_norm = (grad_lin * lin).sum(dim=ctx.dim, keepdim=True).div_(norm).mul_(-0.5)
        return grad_lin.to(lin.dtype), grad_norm.to(norm.dtype), None


class _BcosLinearB2(torch.autograd.Function):
    """The whole B = 2 linear layer in one autograd node: ``out = lin · |lin| / n`` with
    ``lin = x ŵᵀ``, ``ŵ = w / max(||w||, ε)`` (``F.normalize``; ``w`` itself with
    ``weight_norm=False``) and ``n = ||x|| + LINEAR_NORM_EPS``; ``x`` is ``(rows, in)``, the
    output ``(rows, out)``.

    Written with autograd, the layer's backward takes about seven element-wise passes over the
    activations besides its two matrix products (the |cos| factor's, the input norm's, and the sum
    of the two input gradients); this one takes two or three. The input norm's gradient is folded
    into the input gradient, ``grad_x = 2 g ŵ - x · S / (n ||x||)`` with ``g = grad · |cos|`` and
    ``S = Σ grad · out``, and ``S`` is summed over the narrower side: ``Σ grad · out = Σ g · lin =
    ½ (2 g ŵ) · x``. Values and dtypes are the plain layer's, autocast included. Where a graph of
    the backward is requested (``create_graph``, torch.func) the backward recomputes the forward's
    parts from the inputs, so that the same formulas are differentiable in them.
    """

    generate_vmap_rule = True  # torch.func transforms can run it (forward and setup_context apart)

    @staticmethod
    def forward(x: Tensor, weight: Tensor, normalize: bool) -> tuple[Tensor, ...]:
        lin, factor, norm, unit, weight_norm = _b2_parts(x, weight, normalize)
        return lin * factor, lin, factor, norm, unit, weight_norm

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        x, weight, normalize = inputs
        _, lin, factor, norm, unit, weight_norm = output
        ctx.mark_non_differentiable(lin, factor, norm, unit, weight_norm)
        ctx.set_materialize_grads(False)  # no zero gradients made for the parts (two activation-sized)
        ctx.sum_over_outputs = x.shape[-1] > lin.shape[-1]  # where S is summed: the narrower side
        ctx.save_for_backward(x, weight, lin if ctx.sum_over_outputs else None, factor, norm, unit, weight_norm)
        ctx.normalize = normalize

    @staticmethod
    def backward(ctx, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        if grad is None:
            return None, None, None
        x, weight, lin, factor, norm, unit, weight_norm = ctx.saved_tensors
        differentiable = torch.is_grad_enabled()
        if differentiable:  # a graph of the backward: the parts as functions of the inputs
            lin, factor, norm, unit, weight_norm = _b2_parts(x, weight, ctx.normalize)
        unit = unit if ctx.normalize else weight
        need_x, need_weight = ctx.needs_input_grad[:2]
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            g = (grad * factor).to(factor.dtype)  # half the gradient of lin, in the product's dtype
            grad_x = grad_weight = None
            if need_x:
                grad_x = torch.mm(g, unit.to(g.dtype) * 2).to(x.dtype)  # through lin
                if ctx.sum_over_outputs:
                    total = (g * lin).sum(dim=1, keepdim=True).to(x.dtype)
                else:
                    total = (grad_x * x).sum(dim=1, keepdim=True) * 0.5
                raw_norm = norm - LINEAR_NORM_EPS  # ||x||; where x = 0, S = 0 and so is the norm's share
                share = -total / (norm * torch.where(raw_norm > 0, raw_norm, 1.0))
                grad_x = grad_x.addcmul(x, share) if differentiable else grad_x.addcmul_(x, share)
            if need_weight:
                grad_unit = torch.mm(g.t(), x.to(g.dtype)).to(weight.dtype) * 2
                if ctx.normalize:  # F.normalize's backward; where its guard held, the gradient unprojected
                    along = (grad_unit * unit).sum(dim=1, keepdim=True) * (weight_norm > WEIGHT_NORM_EPS)
                    grad_unit = (grad_unit - unit * along) / weight_norm.clamp_min(WEIGHT_NORM_EPS)
                grad_weight = grad_unit
        return grad_x, grad_weight, None


def _b2_parts(x: Tensor, weight: Tensor, normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``lin``, ``|cos|``, ``n``, ``ŵ`` and ``||w||`` of ``_BcosLinearB2`` (the last two empty
    without weight normalisation: ``w`` itself is the map)."""
    if normalize:
        weight_norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
        unit = weight / weight_norm.clamp_min(WEIGHT_NORM_EPS)
    else:
        weight_norm = unit = weight.new_empty(0)
    lin = F.linear(x, unit if normalize else weight)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + LINEAR_NORM_EPS
    return lin, _abs_cos(lin, norm), norm, unit, weight_norm


def _abs_cos(lin: Tensor, norm: Tensor) -> Tensor:
    """``|lin| / norm`` in ``lin``'s dtype (autocast's bf16 where it cast the product). The norm is
    cast first: a bf16 tensor divided in place by a float32 one takes torch's mixed-dtype path, about
    6x slower on a CPU (0.9 against 0.15 ms at 6272 x 768)."""
    return lin.abs().div_(norm.to(lin.dtype))


def bcos_scale(linear_out: Tensor, input_norm: Tensor, b: float, detach: bool, dim: int = -1) -> Tensor:
    """Apply the B-cos factor ``|linear_out / input_norm|^(b-1)`` to ``linear_out``.

    ``input_norm`` broadcasts against ``linear_out`` along the output-channel axis ``dim``
    (where it has size 1): the last axis for tokens, axis 1 for feature maps.
    """
    if b == 1:
        return linear_out
    if detach:
        with torch.no_grad():
            factor = _cos_factor(linear_out, input_norm, b)
        return linear_out * factor
    if b == 2:
        return _SquareCosScale.apply(linear_out, input_norm, dim)
    return linear_out * _cos_factor(linear_out, input_norm, b)


def _cos_factor(linear_out: Tensor, input_norm: Tensor, b: float) -> Tensor:
    abs_cos = linear_out.abs() / input_norm
    if b == 2:
        return abs_cos
    return abs_cos.clamp_min(COS_EPS).pow(b - 1)


class BcosLinear(DetachableModule):
    """B-cos linear layer: ``(..., in_features) -> (..., out_features)``.

    Args:
        b: the alignment exponent B >= 1 (B = 1: unit-norm linear layer).
        max_out: MaxOut units M >= 1; each output is the max over M linear units, taken before
            the B-cos factor.
        bias: add a bias to ``ŵᵀx`` before the B-cos factor. Not dynamic linear: B-cosification
            (``bcosvit.bcosify``) starts from a standard model's biases and decays them to 0.
        weight_norm: normalise the weights to unit norm (B-cos); False keeps their norm, as
            B-cosified layers do (Arya et al. 2024), so a converted layer starts as the original.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        b: float = 2.0,
        max_out: int = 1,
        bias: bool = False,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        if b < 1:
            raise ValueError(f"B-cos exponent b must be >= 1, got {b}")
        if max_out < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        self.in_features = in_features
        self.out_features = out_features
        self.b = float(b)
        self.max_out = max_out
        self.weight_norm = weight_norm
        self.weight = nn.Parameter(torch.empty(out_features * max_out, in_features))
        self.bias = nn.Parameter(torch.empty(out_features * max_out)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw new random weight directions (``nn.Linear``'s default init; only the direction matters)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self._fused_b2(x):
            out = _BcosLinearB2.apply(x.reshape(-1, self.in_features), self.weight, self.weight_norm)[0]
            return out.view(*x.shape[:-1], self.out_features)
        weight = F.normalize(self.weight, dim=1) if self.weight_norm else self.weight
        out = F.linear(x, weight, self.bias)
        if self.max_out > 1:
            out = out.unflatten(-1, (self.out_features, self.max_out)).amax(dim=-1)
        if self.b == 1:
            return out
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + LINEAR_NORM_EPS
        if self.detach:
            norm = norm.detach()
        return bcos_scale(out, norm, self.b, self.detach, dim=-1)

    def _fused_b2(self, x: Tensor) -> bool:
        """Whether the training pass takes the one-node B = 2 layer (``_BcosLinearB2``). Not under
        ``torch.compile``, which fuses the plain layer's element-wise work itself, nor where no
        gradient is recorded (the same operations without a graph)."""
        return (
            self.b == 2
            and self.max_out == 1
            and self.bias is None
            and not self.detach
            and torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
            and not torch.compiler.is_compiling()
        )

    def extra_repr(self) -> str:
        extra = ("" if self.bias is None else ", bias=True") + ("" if self.weight_norm else ", weight_norm=False")
        return f"{self.in_features}, {self.out_features}, b={self.b:g}, max_out={self.max_out}{extra}"


class BcosConv2d(DetachableModule):
    """B-cos 2-D convolution: ``(N, C_in, H, W) -> (N, C_out, H', W')``.

    The cosine uses the norm of each ``k×k×C_in`` input window in place of ``||x||``. ``bias`` and
    ``weight_norm`` as for ``BcosLinear``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        b: float = 2.0,
        max_out: int = 1,
        bias: bool = False,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        if b < 1:
            raise ValueError(f"B-cos exponent b must be >= 1, got {b}")
        if max_out < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.b = float(b)
        self.max_out = max_out
        self.weight_norm = weight_norm
        self.weight = nn.Parameter(torch.empty(out_channels * max_out, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels * max_out)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw new random kernel directions (``nn.Conv2d``'s default init; only the direction matters)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        weight = F.normalize(self.weight.flatten(1), dim=1).view_as(self.weight) if self.weight_norm else self.weight
        out = F.conv2d(x, weight, self.bias, stride=self.stride, padding=self.padding)
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_channels, self.max_out)).amax(dim=2)
        if self.b == 1:
            return out
        norm = self._window_norms(x)
        if self.detach:
            norm = norm.detach()
        return bcos_scale(out, norm, self.b, self.detach, dim=1)

    def _window_norms(self, x: Tensor) -> Tensor:
        """``(N, 1, H', W')``: the guarded norm of each ``k×k×C_in`` input window."""
        if self.kernel_size == 1 and self.stride == 1 and self.padding == 0:
            # A 1×1 convolution is a linear layer at each position: the linear layer's guard (the
            # reference implements the conv stem's last, 1×1 step as a linear layer).
            return torch.linalg.vector_norm(x, dim=1, keepdim=True) + LINEAR_NORM_EPS
        # Sum of squares over each k×k×C_in window (zero padding counts as zeros).
        window_sq = F.avg_pool2d(
            x.square().sum(dim=1, keepdim=True),
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            count_include_pad=True,
        ) * (self.kernel_size**2)
        return (window_sq + NORM_EPS).sqrt()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, b={self.b:g}, max_out={self.max_out}"
            + ("" if self.bias is None else ", bias=True")
            + ("" if self.weight_norm else ", weight_norm=False")
        )
