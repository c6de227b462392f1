"""Layer-level behaviour: each dynamic-linear layer against a hand-written formula (docs/design.md: B-cos
transform, explanation mode)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcosvit
from bcosvit.layers import (
    AddInverse,
    Attention,
    BcosConv2d,
    BcosLayerNorm,
    BcosLayerNorm2d,
    BcosLinear,
    DistancePenalty,
    LayerNorm2d,
    LearnedPositionalEmbedding,
    LogitBias,
    Normalize,
    Rotary2d,
    SinCosPositionalEmbedding,
    explanation_mode,
    is_explanation_mode,
    set_explanation_mode,
    sincos_2d,
)
from bcosvit.layers.attention import explicit_attention_pays
from bcosvit.layers.bcos import LINEAR_NORM_EPS, NORM_EPS, _SquareCosScale

D64 = torch.float64


def _norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The B-cos linear layer's guarded input norm (the reference's: ``||x|| + 1e-12``)."""
    return x.norm(dim=dim, keepdim=True) + LINEAR_NORM_EPS


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight / weight.norm(dim=1, keepdim=True)


# --- BcosLinear ------------------------------------------------------------------------------


def test_bcos_linear_b1_is_unit_norm_linear_map_invariant_to_weight_scale():
    layer = BcosLinear(5, 4, b=1).double()
    x = torch.randn(3, 5, dtype=D64)
    expected = x @ _unit_rows(layer.weight.detach()).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        layer.weight.mul_(7.5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)


def test_bcos_linear_b2_equals_abs_cos_times_projection():
    layer = BcosLinear(6, 3, b=2).double()
    x = torch.randn(2, 4, 6, dtype=D64)
    w = layer.weight.detach()
    out = layer(x)
    for n in range(2):
        for t in range(4):
            for j in range(3):
                w_hat = w[j] / w[j].norm()
                lin = float(w_hat @ x[n, t])
                cos = lin / (math.sqrt(float(x[n, t] @ x[n, t])) + LINEAR_NORM_EPS)
                assert out[n, t, j].item() == pytest.approx(abs(cos) * lin, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("b", [1.5, 2.5, 3.0])
def test_bcos_linear_non_integer_b_matches_formula_with_finite_gradients(b):
    layer = BcosLinear(3, 2, b=b).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, -1.0]]))
    # The first unit is exactly orthogonal to the first input: |cos|^(b-1) has an infinite
    # derivative at 0 without the guard.
    x = torch.tensor([[0.0, 1.0, 1.0], [0.3, -0.2, 0.9]], dtype=D64, requires_grad=True)
    out = layer(x)
    lin = x.detach() @ _unit_rows(layer.weight.detach()).T
    expected = (lin.abs() / _norm(x.detach())).pow(b - 1) * lin
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()
    assert x.grad[1].abs().sum() > 0


@pytest.mark.parametrize("b", [1.0, 2.0])
def test_bcos_linear_maxout_keeps_max_of_linear_units_before_cos_factor(b):
    layer = BcosLinear(5, 3, b=b, max_out=2).double()
    assert layer.weight.shape == (6, 5)
    x = torch.randn(4, 5, dtype=D64)
    lin = (x @ _unit_rows(layer.weight.detach()).T).view(4, 3, 2)
    best = lin.max(dim=-1).values
    expected = best if b == 1 else best * best.abs() / _norm(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [{"b": 0.5}, {"max_out": 0}])
def test_bcos_layers_reject_invalid_b_and_max_out(bad):
    with pytest.raises(ValueError, match="b must be >= 1|max_out must be >= 1"):
        BcosLinear(3, 3, **bad)
    with pytest.raises(ValueError, match="b must be >= 1|max_out must be >= 1"):
        BcosConv2d(3, 3, 3, **bad)


# --- The hand-written B = 2 backward ---------------------------------------------------------


def _away_from_zero(*shape: int) -> torch.Tensor:
    sign = torch.where(torch.rand(*shape) < 0.5, -1.0, 1.0)
    return (sign * (0.2 + torch.rand(*shape))).to(D64)


@pytest.mark.parametrize(
    ("lin_shape", "norm_shape", "dim"),
    [((2, 3, 5), (2, 3, 1), -1), ((2, 4, 3, 3), (2, 1, 3, 3), 1)],
    ids=["tokens_NLD", "feature_map_NCHW"],
)
def test_square_cos_scale_backward_matches_gradcheck_and_plain_autograd(lin_shape, norm_shape, dim):
    lin = _away_from_zero(*lin_shape).requires_grad_()
    norm = (1.0 + torch.rand(*norm_shape, dtype=D64)).requires_grad_()
    custom = lambda a, n: _SquareCosScale.apply(a, n, dim)  # noqa: E731
    assert torch.autograd.gradcheck(custom, (lin, norm))

    grad_out = torch.randn(lin_shape, dtype=D64)
    got = torch.autograd.grad(custom(lin, norm), (lin, norm), grad_out)
    reference = torch.autograd.grad(lin * lin.abs() / norm, (lin, norm), grad_out)
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_bcos_linear_b2_second_derivatives_match_plain_autograd():
    """A gradient penalty in training mode (double backward) must not be silently wrong."""
    layer = BcosLinear(5, 3, b=2).double()
    x = torch.randn(4, 5, dtype=D64, requires_grad=True)

    def reference(inp):
        lin = F.linear(inp, F.normalize(layer.weight, dim=1))
        return lin * lin.abs() / _norm(inp)

    def penalty_gradients(forward):
        (gx,) = torch.autograd.grad(forward(x).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, layer.weight))

    torch.testing.assert_close(layer(x), reference(x), rtol=1e-13, atol=1e-14)
    for got, expected in zip(penalty_gradients(layer), penalty_gradients(reference)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def _one_node(out: torch.Tensor) -> bool:
    """Whether ``out`` comes from ``_BcosLinearB2`` (through the views that restore its shape)."""
    node = out.grad_fn
    while node is not None and type(node).__name__ in ("ViewBackward0", "ReshapeAliasBackward0"):
        node = node.next_functions[0][0]
    return node is not None and type(node).__name__ == "_BcosLinearB2Backward"


def _plain_b2_linear(layer: BcosLinear, x: torch.Tensor) -> torch.Tensor:
    """The B = 2 linear layer written with autograd's operations (what ``_BcosLinearB2`` fuses)."""
    weight = F.normalize(layer.weight, dim=1) if layer.weight_norm else layer.weight
    lin = F.linear(x, weight)
    return lin * lin.abs() / _norm(x)


@pytest.mark.parametrize("weight_norm", [True, False])
@pytest.mark.parametrize(("fan_in", "fan_out"), [(6, 11), (11, 6)], ids=["widening", "narrowing"])
def test_bcos_linear_b2_trains_as_one_node_with_the_plain_layers_gradients(fan_in, fan_out, weight_norm):
    """Both ways of summing the norm's share (over the inputs, over the outputs), with and without
    weight normalisation; a zero input row gets the plain layer's finite gradient (0: the B = 2 layer is
    flat there)."""
    layer = BcosLinear(fan_in, fan_out, b=2, weight_norm=weight_norm).double()
    x = torch.randn(3, 4, fan_in, dtype=D64)
    x[1, 2] = 0
    x.requires_grad_()
    out = layer(x)
    assert _one_node(out)
    grad_out = torch.randn(3, 4, fan_out, dtype=D64)
    got = torch.autograd.grad(out, (x, layer.weight), grad_out)
    expected = torch.autograd.grad(_plain_b2_linear(layer, x), (x, layer.weight), grad_out)
    torch.testing.assert_close(out, _plain_b2_linear(layer, x), rtol=1e-14, atol=1e-16)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    assert torch.isfinite(got[0]).all()


def test_bcos_linear_b2_single_node_only_where_a_graph_is_recorded_outside_explanation_mode():
    layer = BcosLinear(4, 3, b=2)
    x = torch.randn(2, 4, requires_grad=True)
    assert _one_node(layer(x))
    with torch.no_grad():
        assert layer(x).grad_fn is None
        assert torch.equal(layer(x), layer(x.detach().requires_grad_()))  # evaluation's forward = training's
    with explanation_mode(layer):
        assert not _one_node(layer(x))
    for other in (BcosLinear(4, 3, b=2, max_out=2), BcosLinear(4, 3, b=2, bias=True), BcosLinear(4, 3, b=2.5)):
        assert not _one_node(other(x))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-7)


def test_bcos_linear_b2_under_bf16_autocast_matches_the_plain_layer():
    """Same output dtype and values as the layer written with autograd; gradients near float32's."""
    torch.manual_seed(0)
    layer = BcosLinear(64, 96, b=2)
    x = torch.randn(128, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        plain = _plain_b2_linear(layer, x)
    assert out.dtype == torch.bfloat16 and _one_node(out)
    torch.testing.assert_close(out.float(), plain.float(), rtol=1e-2, atol=1e-2)
    grad_out = torch.randn(128, 96)
    got = torch.autograd.grad(out, (x, layer.weight), grad_out.bfloat16())
    expected = torch.autograd.grad(_plain_b2_linear(layer, x), (x, layer.weight), grad_out)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert (g - e).norm() / e.norm() < 2e-2


def test_bcos_linear_b2_jacobian_by_torch_func_matches_plain_autograd():
    layer = BcosLinear(5, 4, b=2).double()
    x = torch.randn(3, 5, dtype=D64)
    jac = torch.func.jacrev(layer)(x)
    expected = torch.autograd.functional.jacobian(lambda t: _plain_b2_linear(layer, t), x)
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-14)


def test_bcos_linear_and_conv_b2_pass_gradcheck_for_input_and_weight():
    linear = BcosLinear(4, 3, b=2).double()
    x = torch.randn(2, 5, 4, dtype=D64, requires_grad=True)
    w = linear.weight.detach().clone().requires_grad_()
    fn = lambda a, b: torch.func.functional_call(linear, {"weight": b}, (a,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w), fast_mode=True)
    conv = BcosConv2d(2, 3, 3, stride=2, padding=1, b=2).double()
    img = torch.randn(1, 2, 5, 5, dtype=D64, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_()
    fn = lambda a, b: torch.func.functional_call(conv, {"weight": b}, (a,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (img, w), fast_mode=True)


# --- BcosConv2d ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "b", "max_out"),
    [(3, 2, 1, 2.0, 1), (3, 1, 1, 2.5, 1), (1, 1, 0, 2.0, 1), (3, 2, 1, 2.0, 2)],
)
def test_bcos_conv2d_equals_bcos_transform_of_each_unfolded_window(kernel, stride, padding, b, max_out):
    conv = BcosConv2d(3, 4, kernel, stride=stride, padding=padding, b=b, max_out=max_out).double()
    x = torch.randn(2, 3, 7, 6, dtype=D64)
    out = conv(x)
    patches = F.unfold(x, kernel, padding=padding, stride=stride)  # (N, C*k*k, L)
    w_hat = _unit_rows(conv.weight.detach().flatten(1))
    lin = torch.einsum("ok,nkl->nol", w_hat, patches)
    if max_out > 1:
        lin = lin.unflatten(1, (4, max_out)).max(dim=2).values
    if (kernel, stride, padding) == (1, 1, 0):  # a 1×1 convolution is a linear layer at each position
        norm = _norm(patches, dim=1)
    else:
        norm = (patches.square().sum(dim=1, keepdim=True) + NORM_EPS).sqrt()
    expected = (lin.abs() / norm).pow(b - 1) * lin
    assert out.shape == (2, 4, *out.shape[2:])
    torch.testing.assert_close(out.flatten(2), expected, rtol=1e-11, atol=1e-13)


def test_bcos_linear_explanation_gradient_is_abs_cos_times_unit_weight():
    layer = BcosLinear(6, 5, b=2).double()
    x = torch.randn(3, 6, dtype=D64, requires_grad=True)
    normal = layer(x)
    with explanation_mode(layer):
        detached = layer(x)
    torch.testing.assert_close(detached, normal, rtol=1e-14, atol=1e-15)
    w_hat = _unit_rows(layer.weight.detach())
    cos = (x.detach() @ w_hat.T).abs() / _norm(x.detach())
    for j in range(5):
        (g,) = torch.autograd.grad(detached[:, j].sum(), x, retain_graph=True)
        torch.testing.assert_close(g, cos[:, j : j + 1] * w_hat[j], rtol=1e-12, atol=1e-14)
        (g_normal,) = torch.autograd.grad(normal[:, j].sum(), x, retain_graph=True)
        assert (g_normal - g).abs().max() > 1e-3  # the full gradient also differentiates |cos|


def test_bcos_conv2d_explanation_mode_is_dynamic_linear_in_each_output():
    conv = BcosConv2d(3, 5, 3, stride=2, padding=1, b=2).double()
    x = torch.randn(1, 3, 5, 5, dtype=D64, requires_grad=True)
    normal = conv(x)
    with explanation_mode(conv):
        detached = conv(x)
    torch.testing.assert_close(detached, normal, rtol=1e-14, atol=1e-15)
    flat = detached.flatten()
    for i in range(0, flat.numel(), 4):
        (g,) = torch.autograd.grad(flat[i], x, retain_graph=True)
        # output = (d output / d x) · x exactly (the eps-guarded norm is inside the constant factor)
        assert (g * x).sum().item() == pytest.approx(flat[i].item(), rel=1e-12, abs=1e-14)
        (g_normal,) = torch.autograd.grad(normal.flatten()[i], x, retain_graph=True)
        assert (g_normal - g).abs().max() > 1e-4


# --- LayerNorms ------------------------------------------------------------------------------


def _ln_manual(x: torch.Tensor, dims: tuple[int, ...], gamma: torch.Tensor, eps: float, const_std: bool):
    centred = x - x.mean(dim=dims, keepdim=True)
    std = (centred.square().mean(dim=dims, keepdim=True) + eps).sqrt()
    return centred / (std.detach() if const_std else std) * gamma


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_bcos_layernorm_matches_formula_and_explanation_gradient_treats_std_as_constant(kind):
    if kind == "1d":
        norm = BcosLayerNorm(6).double()
        x = (3 * torch.randn(2, 3, 6, dtype=D64) + 1).requires_grad_()
        dims, gamma_view = (-1,), lambda g: g
    else:
        norm = BcosLayerNorm2d(4).double()
        x = (3 * torch.randn(2, 4, 3, 2, dtype=D64) + 1).requires_grad_()
        dims, gamma_view = (1, 2, 3), lambda g: g[:, None, None]
    with torch.no_grad():
        norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
    gamma = gamma_view(norm.weight.detach())
    g = torch.randn_like(x)

    for detach in (False, True):
        set_explanation_mode(norm, detach)
        out = norm(x)
        torch.testing.assert_close(out, _ln_manual(x, dims, gamma, norm.eps, False), rtol=1e-12, atol=1e-13)
        (grad,) = torch.autograd.grad((out * g).sum(), x)
        (expected,) = torch.autograd.grad((_ln_manual(x, dims, gamma, norm.eps, detach) * g).sum(), x)
        torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-12)
    # The two modes really differ in their gradients (the std is input dependent).
    (full,) = torch.autograd.grad((_ln_manual(x, dims, gamma, norm.eps, False) * g).sum(), x)
    assert (full - expected).abs().max() > 1e-3
    # No additive bias: a constant input maps to exactly 0.
    assert not any("bias" in name for name, _ in norm.named_parameters())
    assert norm(torch.full_like(x, 3.0)).abs().max() == 0


@pytest.mark.parametrize("bias", [False, True])
def test_explanation_mode_layernorm_backward_and_double_backward_equal_the_written_out_layer(bias):
    """The fused forward with a hand-written backward (std held constant) against autograd through
    the formula: gradients of the input and of γ, β, and their own gradients (create_graph)."""
    norm = BcosLayerNorm(6, bias=bias).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6, dtype=D64) + 0.5)
        if bias:
            norm.bias.copy_(torch.randn(6, dtype=D64))
    set_explanation_mode(norm, True)
    x = (3 * torch.randn(2, 3, 6, dtype=D64) + 1).requires_grad_()
    g = torch.randn(2, 3, 6, dtype=D64)
    params = list(norm.parameters())

    def written_out(x):
        out = _ln_manual(x, (-1,), norm.weight, norm.eps, const_std=True)
        return out + norm.bias if bias else out

    results = []
    for forward in (norm, written_out):
        grads = torch.autograd.grad((forward(x) * g).sum(), [x, *params], create_graph=True)
        second = torch.autograd.grad(sum(t.square().sum() for t in grads), [x, *params], allow_unused=True)
        results.append((grads, second))
    (grads, second), (expected, expected_second) = results
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    for got, want, source in zip(second, expected_second, [x, *params]):
        zeros = torch.zeros_like(source)  # None: no second-order dependence on this source
        got, want = zeros if got is None else got, zeros if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
    assert second[0].abs().max() > 1e-3  # the input's second-order term exists (through γ's gradient)


def test_explanation_mode_layernorm_under_bf16_autocast_stays_near_float32():
    norm = BcosLayerNorm(64)
    set_explanation_mode(norm, True)
    x = (torch.randn(4, 10, 64) * 2 + 1).requires_grad_()
    g = torch.randn(4, 10, 64)
    (full,) = torch.autograd.grad((norm(x) * g).sum(), x)
    with torch.autocast("cpu", torch.bfloat16):
        low = x.to(torch.bfloat16).detach().requires_grad_()
        out = norm(low)
        (grad,) = torch.autograd.grad((out.float() * g).sum(), low)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(x).detach(), rtol=0.02, atol=0.05)
    torch.testing.assert_close(grad.float(), full, rtol=0.02, atol=0.05)


# --- Attention -------------------------------------------------------------------------------


def _attention(rotary: bool, penalty: float = 0.0) -> Attention:
    return Attention(
        8,
        2,
        proj=BcosLinear(8, 8),
        rotary=Rotary2d(4) if rotary else None,
        distance_penalty=DistancePenalty(penalty) if penalty else None,
    ).double()


@pytest.mark.parametrize(
    ("rotary", "penalty"), [(False, 0.0), (True, 0.0), (True, 0.7)], ids=["plain", "rope", "rope+distance"]
)
@pytest.mark.parametrize("detach", [False, True], ids=["normal", "explanation"])
def test_attention_sdpa_path_equals_explicit_softmax_path(rotary, penalty, detach):
    attn = _attention(rotary, penalty)
    set_explanation_mode(attn, detach)
    x = torch.randn(2, 6, 8, dtype=D64)
    fast = attn(x, (2, 3))
    slow, maps = attn(x, (2, 3), return_attn=True)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-13)
    assert maps.shape == (2, 2, 6, 6)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 6, dtype=D64), rtol=1e-13, atol=1e-13)
    # Manual attention from the weights.
    q, k, v = F.linear(x, attn.qkv.weight.detach()).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in (q, k, v))
    if rotary:
        q, k = attn.rotary(q, (2, 3)), attn.rotary(k, (2, 3))
    scores = q @ k.transpose(-1, -2) / 2.0
    if penalty:  # token positions of the 2x3 grid, row-major
        rows, cols = torch.arange(6) // 3, torch.arange(6) % 3
        distance = ((rows[:, None] - rows) ** 2 + (cols[:, None] - cols) ** 2).double().sqrt()
        scores = scores - penalty * distance
    manual = torch.softmax(scores, dim=-1)
    torch.testing.assert_close(maps.detach(), manual, rtol=1e-12, atol=1e-13)


def test_bf16_attention_on_a_cpu_is_written_out_and_stays_near_float32(monkeypatch):
    # torch's fused CPU kernel is several times slower in bf16 than the explicit products (docs/results.md)
    attn = _attention(rotary=True).float()
    x = torch.randn(3, 6, 8)
    reference = attn(x, (2, 3))
    assert not explicit_attention_pays(x) and explicit_attention_pays(x.bfloat16())

    def fused(*args, **kwargs):
        raise AssertionError("the fused kernel ran under bf16 autocast on a CPU")

    monkeypatch.setattr(F, "scaled_dot_product_attention", fused)
    with torch.autocast("cpu", torch.bfloat16):
        assert explicit_attention_pays(x)
        out = attn(x, (2, 3))
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("return_attn", [False, True])
def test_attention_matrix_gets_no_gradient_in_explanation_mode(return_attn):
    attn = _attention(rotary=True)
    x = torch.randn(2, 6, 8, dtype=D64, requires_grad=True)
    g = torch.randn(2, 6, 8, dtype=D64)

    def run():
        out = attn(x, (2, 3), return_attn=return_attn)
        return out if not return_attn else out[0]

    (run() * g).sum().backward()
    assert attn.qkv.weight.grad[:16].abs().sum() > 0  # normal mode: q and k are trained
    attn.zero_grad(set_to_none=True)
    x.grad = None

    with explanation_mode(attn):
        out = run()
        if return_attn:
            assert not attn(x, (2, 3), return_attn=True)[1].requires_grad
        (out * g).sum().backward()
        # Reference: the attention matrix computed as a constant, values live.
        with torch.no_grad():
            q, k, _ = F.linear(x, attn.qkv.weight).chunk(3, dim=-1)
            q, k = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in (q, k))
            a = torch.softmax(attn.rotary(q, (2, 3)) @ attn.rotary(k, (2, 3)).transpose(-1, -2) / 2.0, dim=-1)
        x_ref = x.detach().clone().requires_grad_()
        v = F.linear(x_ref, attn.qkv.weight.detach()[16:]).unflatten(-1, (2, 4)).transpose(1, 2)
        ref = attn.proj((a @ v).transpose(1, 2).flatten(2))
        (x_grad_ref,) = torch.autograd.grad((ref * g).sum(), x_ref)
    assert attn.qkv.weight.grad[:16].abs().max() == 0
    assert attn.qkv.weight.grad[16:].abs().sum() > 0
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(x.grad, x_grad_ref, rtol=1e-11, atol=1e-12)


# --- explanation_mode ------------------------------------------------------------------------


def _stack() -> nn.Sequential:
    return nn.Sequential(BcosLinear(4, 4), BcosLayerNorm(4), nn.Linear(4, 4), BcosLinear(4, 2))


def test_explanation_mode_switches_all_layers_and_restores_each_previous_state():
    model = _stack()
    model[3].detach = True  # a mixed prior state must come back as it was
    with explanation_mode(model) as same:
        assert same is model
        assert all(m.detach for m in (model[0], model[1], model[3]))
    assert [model[0].detach, model[1].detach, model[3].detach] == [False, False, True]
    with explanation_mode(model, enabled=False):
        assert not is_explanation_mode(model)
    assert model[3].detach and is_explanation_mode(model)


def test_explanation_mode_restores_state_when_an_exception_is_raised():
    model = _stack()
    with pytest.raises(RuntimeError, match="boom"), explanation_mode(model):
        assert is_explanation_mode(model)
        raise RuntimeError("boom")
    assert not is_explanation_mode(model)


def test_explanation_mode_works_as_a_decorator_repeatedly():
    model = _stack()
    seen = []

    @explanation_mode(model)
    def inside() -> None:
        seen.append(is_explanation_mode(model) and all(m.detach for m in (model[0], model[1], model[3])))

    inside()
    assert not is_explanation_mode(model)
    inside()
    assert seen == [True, True]
    assert not is_explanation_mode(model)


# --- Encodings, logit bias, positions --------------------------------------------------------


def test_add_inverse_concatenates_image_and_its_inverse():
    x = torch.rand(2, 3, 4, 5)
    z = AddInverse()(x)
    assert z.shape == (2, 6, 4, 5)
    torch.testing.assert_close(z[:, :3], x)
    torch.testing.assert_close(z[:, 3:], 1 - x)


def test_normalize_uses_per_channel_mean_and_std():
    norm = Normalize([0.1, 0.2], [0.5, 2.0])
    x = torch.rand(1, 2, 3, 3)
    torch.testing.assert_close(norm(x)[0, 0], (x[0, 0] - 0.1) / 0.5)
    torch.testing.assert_close(norm(x)[0, 1], (x[0, 1] - 0.2) / 2.0)
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.0], [0.0])


@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_logit_bias_is_log_one_over_classes_minus_one(classes):
    bias = LogitBias(classes)
    assert bias.value == pytest.approx(math.log(1 / (classes - 1)), abs=1e-15)
    logits = torch.randn(2, classes, dtype=D64)
    torch.testing.assert_close(bias(logits), logits + math.log(1 / (classes - 1)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        LogitBias(1)


def test_sincos_embedding_matches_formula_on_small_grid():
    rows, cols, dim, temperature = 2, 3, 8, 10000.0
    emb = sincos_2d((rows, cols), dim, dtype=D64)
    assert emb.shape == (rows * cols, dim)
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            expected = []
            omegas = [1.0 / temperature ** (i / (quarter - 1)) for i in range(quarter)]
            expected += [math.sin(c * o) for o in omegas] + [math.cos(c * o) for o in omegas]
            expected += [math.sin(r * o) for o in omegas] + [math.cos(r * o) for o in omegas]
            torch.testing.assert_close(emb[r * cols + c], torch.tensor(expected, dtype=D64), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)


def test_learned_positional_embedding_is_resized_in_row_major_order():
    pos = LearnedPositionalEmbedding(4, (2, 3)).double()
    with torch.no_grad():  # depends on the row only
        pos.weight.copy_(torch.arange(2, dtype=D64).repeat_interleave(3)[:, None] * torch.tensor([1.0, 2, 3, 4]))
    assert pos.embedding((2, 3)) is pos.weight
    resized = pos.embedding((2, 5))
    assert resized.shape == (10, 4)
    torch.testing.assert_close(resized.view(2, 5, 4), pos.weight.detach().view(2, 3, 4)[:, :1].expand(2, 5, 4))
    tokens = torch.zeros(1, 10, 4, dtype=D64)
    torch.testing.assert_close(pos(tokens, (2, 5))[0], resized)


def test_sincos_positional_embedding_gives_the_formula_for_other_grids():
    pos = SinCosPositionalEmbedding(8, (2, 2))
    torch.testing.assert_close(pos.embedding((3, 4)), sincos_2d((3, 4), 8))
    assert not any(True for _ in pos.parameters())


def test_distance_penalty_is_minus_slope_times_euclidean_token_distance():
    bias = DistancePenalty(0.5)((2, 3), torch.device("cpu"), D64)
    assert bias.shape == (6, 6)
    torch.testing.assert_close(bias, bias.T)
    assert (bias.diagonal() == 0).all() and (bias[~torch.eye(6, dtype=torch.bool)] < 0).all()
    # token 0 is (0, 0); token 5 is (1, 2): distance sqrt(5); token 2 is (0, 2): distance 2
    assert bias[0, 5].item() == pytest.approx(-0.5 * 5**0.5) and bias[0, 2].item() == pytest.approx(-1.0)
    assert not any(True for _ in DistancePenalty(0.5).parameters())
    # exact on the larger grids of the pointing game too (no matmul shortcut for the distances)
    large = DistancePenalty(1.0)((14, 14), torch.device("cpu"), D64)
    assert (large.diagonal() == 0).all() and large[0, 15].item() == -(2**0.5)


def test_distance_penalty_keeps_attention_near_each_token():
    torch.manual_seed(0)
    x = torch.randn(1, 36, 8, dtype=D64)
    grid = (6, 6)
    far = (DistancePenalty(1.0)(grid, torch.device("cpu"), D64) < -2.5).double()  # more than 2.5 tokens away
    shares = [(_attention(True, p)(x, grid, return_attn=True)[1] * far).sum(-1).mean().item() for p in (0, 1, 3)]
    assert shares[0] > 0.4 and shares[0] > shares[1] > shares[2] and shares[2] < 0.01


def test_rotary_preserves_norms():
    rot = Rotary2d(8)
    x = torch.randn(2, 3, 12, 8, dtype=D64)
    y = rot(x, (3, 4))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=1e-13)
    assert (y - x).abs().max() > 1e-2


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_rotary_scores_depend_only_on_position_difference_along_one_axis(axis):
    rot = Rotary2d(8)
    length = 5
    grid = (length, 1) if axis == "rows" else (1, length)
    q = torch.randn(8, dtype=D64).expand(1, 1, length, 8)
    k = torch.randn(8, dtype=D64).expand(1, 1, length, 8)
    scores = (rot(q, grid) @ rot(k, grid).transpose(-1, -2))[0, 0]
    for shift in range(-length + 1, length):
        diagonal = torch.diagonal(scores, offset=shift)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-12, atol=1e-12)
    assert (scores[0, 1] - scores[0, 3]).abs() > 1e-3  # but it does depend on the difference
    # Axial layout: moving along one axis leaves the pairs of the other axis untouched.
    rotated = rot(q, grid)[0, 0]
    untouched = [2, 3, 6, 7] if axis == "rows" else [0, 1, 4, 5]
    torch.testing.assert_close(rotated[:, untouched], q[0, 0][:, untouched])


# --- reset_parameters: outside tools re-initialise layers through it --------------------------------------

# How to build a fresh module like ``m`` (same shapes and options), for every parameter-owning type.
_REBUILD = {
    BcosLinear: lambda m: BcosLinear(m.in_features, m.out_features, b=m.b, max_out=m.max_out),
    BcosConv2d: lambda m: BcosConv2d(
        m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding, b=m.b, max_out=m.max_out
    ),
    BcosLayerNorm: lambda m: BcosLayerNorm(m.dim, eps=m.eps),
    BcosLayerNorm2d: lambda m: BcosLayerNorm2d(m.channels, eps=m.eps),
    LearnedPositionalEmbedding: lambda m: LearnedPositionalEmbedding(m.dim, m.grid),
    nn.Linear: lambda m: nn.Linear(m.in_features, m.out_features, bias=m.bias is not None),
    nn.Conv2d: lambda m: nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding, bias=m.bias is not None
    ),
    nn.LayerNorm: lambda m: nn.LayerNorm(m.normalized_shape, eps=m.eps, bias=m.bias is not None),
    LayerNorm2d: lambda m: LayerNorm2d(m.num_channels, eps=m.eps),
}


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


@pytest.fixture(scope="module")
def parameter_owning_layers() -> dict[type, nn.Module]:
    """One module of each parameter-owning type found in tiny builds of every registered model.

    Learned positional embeddings and MaxOut units are options, not registered configurations: the
    nano pair is also built with them.
    """
    builds = []
    for name in bcosvit.list_models():
        patch = bcosvit.models.model_config(name).patch_size
        builds.append(bcosvit.create_model(name, image_size=2 * patch, embed_dim=8, depth=1, num_heads=2))
    for name in ("bcos_vit_nano_patch4_28", "vit_nano_patch4_28"):
        options = dict(image_size=8, embed_dim=8, depth=1, num_heads=2, pos_embed="learned", max_out=2)
        builds.append(bcosvit.create_model(name, **options))
    return {type(m): m for model in builds for m in model.modules() if _owns_parameters(m)}


def test_every_parameter_owning_layer_in_the_registry_models_has_reset_parameters(parameter_owning_layers):
    missing = [t.__name__ for t in parameter_owning_layers if not hasattr(t, "reset_parameters")]
    assert not missing, f"layers with parameters but no reset_parameters (invisible to Quantus' MPRT): {missing}"
    unknown = [t.__name__ for t in parameter_owning_layers if t not in _REBUILD]
    assert not unknown, f"new parameter-owning layer types, add them to _REBUILD: {unknown}"
    assert {BcosLinear, BcosConv2d, BcosLayerNorm, BcosLayerNorm2d, LearnedPositionalEmbedding} <= set(
        parameter_owning_layers
    )


def test_reset_parameters_redraws_exactly_what_the_constructor_draws(parameter_owning_layers):
    # Same seed, same values: the constructor's only initialisation is its call of reset_parameters.
    for kind, example in parameter_owning_layers.items():
        torch.manual_seed(1)
        layer = _REBUILD[kind](example)
        initial = {name: p.detach().clone() for name, p in layer.named_parameters()}
        with torch.no_grad():  # as after training: every value moved
            for p in layer.parameters():
                p.add_(1.0 + torch.rand_like(p))
        torch.manual_seed(1)
        layer.reset_parameters()
        for name, p in layer.named_parameters():
            assert torch.equal(p, initial[name]), f"{kind.__name__}.{name} is not re-initialised as constructed"


@pytest.mark.parametrize(
    "make_layer, input_shape",
    [(lambda: BcosLinear(6, 4), (2, 6)), (lambda: BcosConv2d(2, 4, 3, padding=1), (2, 2, 5, 5))],
    ids=["linear", "conv"],
)
def test_bcos_layer_reset_draws_new_weight_directions_not_a_rescale(make_layer, input_shape):
    # B-cos layers normalise their weights, so a reset that only rescaled them would change nothing.
    layer, x = make_layer(), torch.rand(input_shape)
    with torch.no_grad():
        before = layer(x)
        torch.manual_seed(123)
        layer.reset_parameters()
        after = layer(x)
    assert (after - before).abs().max() > 0.1 * before.abs().max()


# --- timm's Eva rotary embeddings (TimmRotary2d) -------------------------------------------------------------
# Each case: a timm Eva model at a small, non-square size whose coordinates float32 holds exactly (timm builds its
# grids in float32), so timm's own table builders, given float64 frequencies, give float64-exact tables.

from bcosvit.layers import TimmRotary2d  # noqa: E402
from bcosvit.timm_conversion import rotary_from_timm  # noqa: E402

from .eva_tables import exact_rope_table as _eva_exact_table  # noqa: E402

_EVA_CASES = {
    "vit_small_patch16_rope_224": (64, 96),  # cat, 'xy', temperature 100, interleaved, class token
    "vit_base_patch16_rope_reg1_gap_256": (64, 128),  # cat, ref_feat_shape (16, 16), 1 register, no class token
    "vit_small_patch16_dinov3": (64, 128),  # dinov3, half layout, class + 4 registers, dynamic size
    "eva02_tiny_patch14_224": (56, 112),  # cat, ref_feat_shape (16, 16), interleaved, class token
    "vit_small_patch16_rope_mixed_224": (64, 96),  # mixed: learned per-block, per-head frequencies
}


def _eva(name: str, img_size: tuple[int, int]) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=img_size).double().eval()
    if model.rope_mixed:  # timm draws its (learned) frequencies in float32; give them float64 digits
        with torch.no_grad():
            model.rope.freqs.add_(1e-3 * torch.rand_like(model.rope.freqs))
    return model


def _eva_grid(model: nn.Module, img_size: tuple[int, int]) -> tuple[int, int]:
    patch = model.patch_embed.patch_size
    return img_size[0] // patch[0], img_size[1] // patch[1]


def _timm_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys, values ``(N, heads, L, head_dim)`` from a timm Eva block's attention, before rope."""
    if getattr(attn, "q_bias", None) is not None:  # EvaAttention: learned q and v biases, a zero k bias
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    else:  # AttentionRope: one qkv bias, or EvaAttention without biases
        bias = getattr(attn.qkv, "bias", None)
    qkv = F.linear(x, attn.qkv.weight, bias)
    q, k, v = qkv.reshape(x.shape[0], x.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _timm_rotated_qk(monkeypatch, attn: nn.Module, x: torch.Tensor, rope: torch.Tensor):
    """The queries, keys and values timm's attention hands to scaled_dot_product_attention."""
    seen = {}
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attn, "fused_attn", True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        attn(x, rope=rope)
    monkeypatch.undo()
    return seen["q"], seen["k"], seen["v"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(_EVA_CASES))
def test_timm_rotary_turns_queries_and_keys_exactly_as_timm_eva_attention(name, monkeypatch):
    img_size = _EVA_CASES[name]
    model = _eva(name, img_size)
    grid, npt, block = _eva_grid(model, img_size), model.num_prefix_tokens, 1
    attn = model.blocks[block].attn
    torch.manual_seed(1)
    x = torch.randn(2, npt + grid[0] * grid[1], model.embed_dim, dtype=D64)

    q_timm, k_timm, v_timm = _timm_rotated_qk(monkeypatch, attn, x, _eva_exact_table(model, grid, block))
    q, k, v = _timm_qkv(attn, x)
    assert torch.equal(v, v_timm)  # same projections as timm's
    rotary = rotary_from_timm(model.rope, npt, block=block)
    assert _rel(rotary(q, grid), q_timm) <= 1e-12
    assert _rel(rotary(k, grid), k_timm) <= 1e-12
    assert torch.equal(rotary(q, grid)[:, :, :npt], q[:, :, :npt])  # class and register tokens stay put
    assert _rel(q_timm, q) > 1e-2  # and the patches did turn

    # negative controls: the other pair layout, the other axis order, or another block's frequencies differ
    if model.rope_mixed:
        assert _rel(rotary_from_timm(model.rope, npt, block=0)(q, grid), q_timm) > 1e-3
    else:
        other_layout = rotary_from_timm(model.rope, npt)
        other_layout.rotate_half = not other_layout.rotate_half
        assert _rel(other_layout(q, grid), q_timm) > 1e-3
    other_axes = rotary_from_timm(model.rope, npt, block=block)
    other_axes.grid_indexing = {"ij": "xy", "xy": "ij"}[other_axes.grid_indexing]
    assert _rel(other_axes(q, grid), q_timm) > 1e-3
    # a wrong prefix count cannot go unnoticed: the remaining tokens no longer fill the grid
    for wrong in (npt - 1, npt + 1):
        if wrong >= 0:
            with pytest.raises(ValueError, match="do not fill"):
                rotary_from_timm(model.rope, wrong, block=block)(q, grid)


@pytest.mark.parametrize("name", list(_EVA_CASES))
def test_timm_rotary_matches_a_whole_timm_forward_up_to_timms_float32_tables(name, monkeypatch):
    # In a real forward timm hands each block the tables it built (in float32, then cast): the rotation of every
    # block agrees up to that rounding, so the right table reaches the right block at the model's grid.
    img_size = _EVA_CASES[name]
    model = _eva(name, img_size)
    grid, npt = _eva_grid(model, img_size), model.num_prefix_tokens
    inputs, seen = {}, []
    for i, blk in enumerate(model.blocks[:3]):
        blk.attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append((q, k)) or sdpa(q, k, v)
    )
    for blk in model.blocks:
        monkeypatch.setattr(blk.attn, "fused_attn", True)
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, *img_size, dtype=D64))
    monkeypatch.undo()
    for i in inputs:
        q, k, _ = _timm_qkv(model.blocks[i].attn, inputs[i])
        rotary = rotary_from_timm(model.rope, npt, block=i)
        assert _rel(rotary(q, grid), seen[i][0]) <= 1e-5
        assert _rel(rotary(k, grid), seen[i][1]) <= 1e-5


def test_timm_rotary_angles_follow_the_grid_where_timm_rescales_or_normalises_coordinates():
    # EVA's ref_feat_shape and DINOv3's normalised coordinates make the angles depend on the grid; the plain
    # index grid of RoPE-Axial does not. Checked against timm's tables at a non-power-of-two grid (float32 digits).
    for name, dependent in [
        ("eva02_tiny_patch14_224", True),
        ("vit_small_patch16_dinov3", True),
        ("vit_small_patch16_rope_224", False),
    ]:
        model = _eva(name, _EVA_CASES[name])
        rotary = rotary_from_timm(model.rope, model.num_prefix_tokens)
        cos_small, _ = rotary._cos_sin((3, 5), torch.device("cpu"), D64)
        cos_large, _ = rotary._cos_sin((6, 7), torch.device("cpu"), D64)
        first_row = [0, 1, 2, 3, 4]  # tokens (0, 0..4) in both grids
        moved = (cos_small[first_row] - cos_large[[0, 1, 2, 3, 4]]).abs().max()
        assert (moved > 1e-3) == dependent, name
        table = model.rope.get_embed(shape=[3, 5]) if model.dynamic_img_size else None
        if table is None:
            model.set_input_size(img_size=(3 * model.patch_embed.patch_size[0], 5 * model.patch_embed.patch_size[1]))
            table = model.rope.get_embed()
        sin_timm, cos_timm = table.double().chunk(2, dim=-1)
        _, sin_small = rotary._cos_sin((3, 5), torch.device("cpu"), D64)
        torch.testing.assert_close(cos_small, cos_timm, rtol=0, atol=5e-6)
        torch.testing.assert_close(sin_small, sin_timm, rtol=0, atol=5e-6)


def test_timm_rotary_is_a_rotation_with_float64_tables_and_learned_mixed_frequencies():
    rotary = TimmRotary2d(16, num_prefix_tokens=1, rope_type="dinov3", rotate_half=True, temperature=100.0)
    x = torch.randn(2, 3, 1 + 12, 16, dtype=D64)
    y = rotary(x, (3, 4))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-14, atol=0)
    cos, sin = rotary._cos_sin((3, 4), torch.device("cpu"), D64)
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos), rtol=0, atol=1e-15)
    mixed = TimmRotary2d(16, rope_type="mixed", num_heads=3, temperature=10.0)
    assert [name for name, _ in mixed.named_parameters()] == ["freqs"] and mixed.freqs.shape == (2, 3, 8)
    mixed(x[:, :, 1:], (3, 4)).sum().backward()
    assert mixed.freqs.grad is not None and mixed.freqs.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        TimmRotary2d(16, rope_type="mixed")  # needs num_heads
    with pytest.raises(ValueError):
        TimmRotary2d(16, rope_type="dinov3", ref_grid=(4, 4))


_REBUILD[TimmRotary2d] = lambda m: TimmRotary2d(
    m.head_dim,
    num_prefix_tokens=m.num_prefix_tokens,
    rope_type=m.rope_type,
    temperature=m.temperature,
    grid_indexing=m.grid_indexing,
    num_heads=m.num_heads,
)


class _TablesUser(nn.Module):
    """Queries and keys turned by each rotary kind, plus the distance penalty: every cached table."""

    def __init__(self) -> None:
        super().__init__()
        self.rotary = Rotary2d(8)
        self.timm_rotary = TimmRotary2d(8, num_prefix_tokens=0, rope_type="cat")
        self.penalty = DistancePenalty(0.5)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        grid = (2, 3)
        turned = self.rotary(q, grid) + self.timm_rotary(q, grid)
        return turned @ turned.transpose(-1, -2) + self.penalty(grid, q.device, q.dtype)


def test_cached_position_tables_do_not_recompile_a_compiled_model_on_its_second_call():
    """A table cached on the first traced call used to fail dynamo's guard on the second call, compiling
    the whole model twice (the main job's RoPE model: twice ~45 s on 2 cores)."""
    torch._dynamo.reset()
    user = _TablesUser()
    compiled = torch.compile(user, backend="eager")
    q = torch.randn(2, 1, 6, 8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled(q)
        second = compiled(q)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, user(q))  # eager fills the caches; the same values
    torch._dynamo.reset()
