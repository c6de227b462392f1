"""timm ViTs as bcosvit standard twins (``from_timm``), checked to compute the same function.

``from_timm(model)`` reads a timm ``VisionTransformer`` or ``Eva`` model into a bcosvit
``VisionTransformer`` of the standard family with the same weights: each timm feature is a
configuration of the one ViT definition (``bcosvit.models.vit``), never a second model. Supported, as
the foundation models use them (docs/design.md#b-cosification):

- a class token and register tokens (DINOv2-reg, DINOv3, ``*_reg4_gap``), their positions inside or
  outside ``pos_embed`` (``no_embed_class``: DeiT-III, DINOv2-reg);
- LayerScale (DINOv2, DINOv3, DeiT-III, ``vit_medium``/``betwixt``), a pre-norm (CLIP), query/key norms;
- GELU, QuickGELU (OpenAI CLIP) and SiLU MLPs, SwiGLU (EVA-02, packed or not, with its inner norm);
- timm's rotary embeddings of the ``Eva`` class (RoPE-Axial and RoPE-Mixed ViTs, EVA-02, DINOv3:
  ``layers.TimmRotary2d``), on the patch tokens only;
- the final norm on every token (``norm``) or on the pooled features (``fc_norm``), token, mean or
  attention pooling (SigLIP's MAP head), and headless backbones (``num_classes=0``: DINO, MAE,
  DINOv2, DINOv3, SigLIP, EVA-02), whose output is the pooled features.

Everything else is refused by name (``ConfigError``), and every conversion is compared with the timm
model on a seeded float64 probe batch (``check_same_function``), so that a timm feature this module
does not know of cannot be dropped silently.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .layers import TimmRotary2d
from .models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer, ViTConfig, built_like

# The largest relative difference of the outputs accepted between a converted model and the original
# on the probe batch, in float64 (a faithful conversion differs by rounding: ~1e-15).
PROBE_TOLERANCE = 1e-6


def from_timm(model: nn.Module) -> VisionTransformer:
    """The bcosvit standard twin computing the same logits (or, headless, features) as a timm
    ``VisionTransformer``; its input normalisation comes from ``model.pretrained_cfg``.

    ``ConfigError`` names the feature of ``model`` that has no counterpart here (the timm class, the
    block, attention, MLP or norm kind), or the difference the probe comparison found.
    """
    eva = _is(model, "Eva")
    (_check_eva_supported if eva else _check_timm_supported)(model)
    mean, std = _timm_normalisation(model)
    twin = built_like((_eva_config if eva else _timm_config)(model, mean, std), model)
    twin.load_state_dict((_eva_state if eva else _timm_state)(model, twin))
    check_same_function(twin, model, mean, std)
    return twin


def _shared_fields(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> dict:
    """The ``ViTConfig`` fields that timm's VisionTransformer and Eva classes spell alike."""
    patch, attn, norm = model.patch_embed, model.blocks[0].attn, model.blocks[0].norm1
    return dict(
        bcos=False,
        image_size=int(patch.img_size[0]),
        patch_size=int(patch.patch_size[0]),
        in_chans=int(patch.proj.in_channels),
        num_classes=0 if isinstance(model.head, nn.Identity) else int(model.head.out_features),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(attn.num_heads),
        pos_embed="learned" if model.pos_embed is not None else "none",
        input_mean=list(mean),
        input_std=list(std),
        attn_bias=attn.proj.bias is not None,
        norm_eps=float(norm.eps),
        class_token=model.cls_token is not None,
        global_pool=model.global_pool,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        final_norm="tokens" if not isinstance(model.norm, nn.Identity) else "pooled",
    )


def _timm_config(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> ViTConfig:
    block = model.blocks[0]
    return ViTConfig(
        **_shared_fields(model, mean, std),
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        layer_scale=not isinstance(block.ls1, nn.Identity),
        act=_activation_kind(block.mlp.act),
    )


@torch.no_grad()
def check_same_function(
    twin: VisionTransformer, model: nn.Module, mean: Sequence[float], std: Sequence[float], images: int = 2
) -> float:
    """Raise ``ConfigError`` unless ``twin`` computes the timm ``model``'s outputs: both in float64
    (copies) on a seeded probe batch of ``images`` random images in [0, 1], timm's normalised with
    ``mean``/``std`` as its ``pretrained_cfg`` says; their largest difference relative to the
    outputs' largest magnitude must stay below ``PROBE_TOLERANCE``. Returns that difference.

    This catches what the feature checks cannot: a timm feature bcosvit does not know of, left
    out silently (timm's RoPE models were once converted with a relative logit error of 1.8)."""
    shape = (1, -1, 1, 1)
    mean64 = torch.tensor(mean, dtype=torch.float64).view(shape)
    std64 = torch.tensor(std, dtype=torch.float64).view(shape)
    reference = copy.deepcopy(model).double().eval()
    return check_same_outputs(twin, lambda x: reference((x - mean64) / std64), f"timm {type(model).__name__}", images)


@torch.no_grad()
def check_same_outputs(
    converted: VisionTransformer, reference: Callable[[Tensor], Tensor], what: str, images: int = 2
) -> float:
    """Raise ``ConfigError`` unless ``converted`` (a float64 copy) and ``reference`` (a float64
    function of images in [0, 1]) agree within ``PROBE_TOLERANCE`` on a seeded probe batch; returns
    their largest difference relative to the reference outputs' largest magnitude."""
    size = converted.image_size
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(images, converted.in_chans, size, size, generator=generator, dtype=torch.float64)
    ours = copy.deepcopy(converted).double().eval()(probe)
    theirs = reference(probe).to(torch.float64)
    if ours.shape != theirs.shape:
        raise ConfigError(
            f"the converted model's outputs have shape {tuple(ours.shape)}, the {what}'s {tuple(theirs.shape)}"
        )
    difference = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
    if not difference < PROBE_TOLERANCE:
        raise ConfigError(
            f"the converted model does not compute the {what}'s outputs: on a probe batch their relative "
            f"difference is {difference:.2e}, above the tolerance {PROBE_TOLERANCE:g}; the model has a feature "
            "bcosvit does not convert (please report it with the model's name)"
        )
    return difference


# --- what is supported ---------------------------------------------------------------------


def _timm_classes() -> dict[str, type]:
    """timm's classes that the conversion reads, by name (empty when timm is not installed)."""
    try:
        from timm.layers import AttentionPoolLatent, LayerScale, Mlp, PatchEmbed
        from timm.layers import activations as timm_activations
        from timm.layers.attention import AttentionRope
        from timm.layers.mlp import GluMlp, SwiGLU
        from timm.models.eva import Eva, EvaAttention, EvaBlock
        from timm.models.vision_transformer import Attention, Block
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
    except ImportError:
        return {}
    return {
        "VisionTransformer": TimmVisionTransformer,
        "Block": Block,
        "Attention": Attention,
        "Mlp": Mlp,
        "LayerScale": LayerScale,
        "PatchEmbed": PatchEmbed,
        "AttentionPoolLatent": AttentionPoolLatent,
        "Eva": Eva,
        "EvaBlock": EvaBlock,
        "EvaAttention": EvaAttention,
        "AttentionRope": AttentionRope,
        "GluMlp": GluMlp,
        "SwiGLU": SwiGLU,
        "GELU": timm_activations.GELU,
        "QuickGELU": timm_activations.QuickGELU,
    }


def _activation_kind(act: nn.Module) -> str | None:
    """bcosvit's name of a timm MLP activation (None: not one bcosvit has)."""
    timm = _timm_classes()
    if (isinstance(act, nn.GELU) and act.approximate == "none") or type(act) is timm.get("GELU"):
        return "gelu"
    if type(act) is timm.get("QuickGELU"):
        return "quick_gelu"
    if isinstance(act, nn.SiLU):
        return "silu"
    return None


def _is(module: object, kind: str) -> bool:
    timm = _timm_classes()
    return kind in timm and type(module) is timm[kind]


def _check_timm_supported(model: nn.Module) -> None:
    if _timm_classes() and type(model).__module__.startswith("timm.") and not _is(model, "VisionTransformer"):
        # subclasses (the distilled DeiT) and other classes with the same attribute names compute
        # something else: only timm's VisionTransformer and Eva classes themselves are read
        raise ConfigError(
            "bcosvit converts timm's VisionTransformer and Eva classes; this is "
            f"{type(model).__module__}.{type(model).__name__}"
            + (" (a distillation token)" if getattr(model, "dist_token", None) is not None else "")
        )
    needed = ("blocks", "patch_embed", "cls_token", "pos_embed", "global_pool", "head", "norm", "fc_norm")
    missing = [name for name in needed if not hasattr(model, name)]
    if missing or (_timm_classes() and not _is(model, "VisionTransformer")):
        raise ConfigError(
            "expected a bcosvit standard twin or a timm VisionTransformer or Eva model, got "
            f"{type(model).__name__}" + (f" (no {missing})" if missing else "")
        )
    problems = [*_model_problems(model), *_head_problems(model)]
    in_blocks: dict[str, list[int]] = {}
    for k, block in enumerate(model.blocks):
        for problem in _block_problems(block, model.blocks[0]):
            in_blocks.setdefault(problem, []).append(k)
    for problem, blocks in in_blocks.items():
        where = "every block" if len(blocks) == len(model.blocks) else "blocks " + ", ".join(map(str, blocks[:5]))
        problems.append(f"{problem} ({where})")
    if problems:
        raise ConfigError(
            f"this timm {type(model).__name__} has {', '.join(sorted(set(problems)))}, which bcosvit models do not "
            "(what converts: docs/design.md#b-cosification)"
        )


def _model_problems(model: nn.Module) -> list[str]:
    problems = []
    patch = model.patch_embed
    if not _is(patch, "PatchEmbed") or not isinstance(patch.norm, nn.Identity):
        problems.append("a patch embedding other than timm's PatchEmbed without a norm")
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic_img_size")
    norms = (model.norm, model.fc_norm)
    if not all(isinstance(norm, nn.Identity | nn.LayerNorm) for norm in norms):
        problems.append("final norms other than LayerNorm")
    elif sum(isinstance(norm, nn.LayerNorm) for norm in norms) != 1:
        both = isinstance(model.norm, nn.LayerNorm)
        problems.append("two final norms (norm and fc_norm)" if both else "no final norm")
    if not isinstance(model.norm_pre, nn.Identity | nn.LayerNorm):
        problems.append(f"a pre-norm {type(model.norm_pre).__name__}")
    if model.global_pool not in ("token", "avg", "map"):
        problems.append(f"global_pool={model.global_pool!r} (token, avg or map are supported)")
    if getattr(model, "pool_include_prefix", False):
        problems.append("pooling over the prefix tokens too (pool_include_prefix)")
    if not isinstance(getattr(model, "head_drop", nn.Identity()), nn.Identity | nn.Dropout):
        problems.append("a head dropout module of another kind")
    return problems


def _head_problems(model: nn.Module) -> list[str]:
    problems = []
    if not isinstance(model.head, nn.Identity | nn.Linear):
        problems.append(f"a head {type(model.head).__name__}")
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return problems
    if not _is(pool, "AttentionPoolLatent"):
        return [*problems, f"attention pooling of kind {type(pool).__name__}"]
    if pool.pos_embed is not None or pool.pool != "token" or isinstance(pool.q, nn.Identity):
        problems.append("an attention pool with its own positions, average pooling or no query projection")
    if pool.mlp is None or pool.latent.shape[-1] != model.embed_dim:
        problems.append("an attention pool without an MLP or with a latent of another width")
    elif _activation_kind(pool.mlp.act) != _activation_kind(model.blocks[0].mlp.act):
        problems.append("an attention pool whose MLP activation differs from the blocks'")
    elif pool.mlp.fc1.out_features != model.blocks[0].mlp.fc1.out_features:
        problems.append("an attention pool whose MLP width differs from the blocks'")
    if not isinstance(pool.norm, nn.LayerNorm) or (pool.kv.bias is None) != (model.blocks[0].attn.qkv.bias is None):
        problems.append("an attention pool with another norm or bias layout than the blocks'")
    return problems


def _block_problems(block: nn.Module, first: nn.Module) -> list[str]:
    """What ``block`` has that bcosvit's blocks do not, or how it differs from the ``first`` block."""
    if not _is(block, "Block"):
        return [f"a {type(block).__name__} block"]
    problems = []
    attn, mlp = block.attn, block.mlp
    if not _is(attn, "Attention") or not isinstance(attn.norm, nn.Identity):
        problems.append(f"an attention of kind {type(attn).__name__} or with an inner norm")
    elif getattr(attn, "gate", None) is not None:
        problems.append("a gated attention")
    if not isinstance(attn.q_norm, nn.Identity | nn.LayerNorm):
        problems.append(f"query/key norms of kind {type(attn.q_norm).__name__}")
    if not _is(mlp, "Mlp") or not isinstance(mlp.norm, nn.Identity):
        problems.append(f"an MLP of kind {type(mlp).__name__} or with an inner norm")
    elif _activation_kind(mlp.act) is None:
        problems.append(f"MLP activation {type(mlp.act).__name__}")
    if not isinstance(block.norm1, nn.LayerNorm) or not isinstance(block.norm2, nn.LayerNorm):
        problems.append("norms other than LayerNorm")
    for scale in (block.ls1, block.ls2):
        if not isinstance(scale, nn.Identity) and not _is(scale, "LayerScale"):
            problems.append(f"a residual scale of kind {type(scale).__name__}")
    if block is not first and _block_layout(block) != _block_layout(first):
        problems.append("blocks of different layouts")
    return problems


def _block_layout(block: nn.Module) -> tuple:
    attn, mlp = block.attn, block.mlp
    return (
        attn.num_heads,
        attn.qkv.bias is None,
        attn.proj.bias is None,
        type(attn.q_norm),
        type(block.ls1),
        type(block.ls2),
        _activation_kind(mlp.act),
        mlp.fc1.out_features,
        float(block.norm1.eps),
        float(block.norm2.eps),
    )


def _timm_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = int(model.patch_embed.proj.in_channels)
    mean = tuple(float(m) for m in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(s) for s in cfg.get("std", IMAGENET_STD))
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"the timm model's pretrained_cfg gives mean {mean} and std {std} for {channels} input channels"
        )
    return mean, std


# --- weights -------------------------------------------------------------------------------


def _timm_state(model: nn.Module, twin: VisionTransformer) -> dict[str, Tensor]:
    """``twin``'s state dict holding the timm model's weights."""
    source = model.state_dict()
    state = dict(twin.state_dict())  # the input normalisation buffers come from the twin's config
    conv = source["patch_embed.proj.weight"]  # (D, C, p, p) -> (D, p·p·C) in (p1 p2 c) order
    state["tokenizer.proj.weight"] = conv.permute(0, 2, 3, 1).flatten(1)
    state["tokenizer.proj.bias"] = source.get("patch_embed.proj.bias", torch.zeros(conv.shape[0], dtype=conv.dtype))
    state.update(_prefix_and_positions(model, source))
    final_norm = "norm." if twin.config.final_norm == "tokens" else "fc_norm."
    for key, value in source.items():
        if key.startswith(("blocks.", "head.", "norm_pre.", "attn_pool.")):
            state[key] = value
        elif key.startswith(final_norm):
            state["norm." + key[len(final_norm) :]] = value
    expected = twin.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unread = sorted(
        k for k in source if k.startswith(("blocks.", "head.", "norm_pre.", "attn_pool.")) and k not in expected
    )
    if missing or unread:
        raise ConfigError(
            f"the timm model's weights do not fit the converted layout (missing {missing[:5]}, unread {unread[:5]})"
        )
    return {k: v.to(expected[k].dtype) for k, v in state.items() if k in expected}


def _prefix_and_positions(model: nn.Module, source: dict[str, Tensor]) -> dict[str, Tensor]:
    """The class token, the register tokens and the patch positions: a prefix token's own row of
    ``pos_embed`` (timm's layout unless ``no_embed_class``) is folded into the token, a constant."""
    prefix = [name for name in ("cls_token", "reg_token") if source.get(name) is not None]
    tokens = {name: source[name] for name in prefix}
    if "pos_embed" not in source:
        return tokens
    positions = source["pos_embed"][0]  # (prefix rows + L, D)
    rows = 0 if getattr(model, "no_embed_class", False) else sum(tokens[n].shape[1] for n in prefix)
    start = 0
    for name in prefix:
        count = tokens[name].shape[1]
        if rows:
            tokens[name] = tokens[name] + positions[start : start + count]
        start += count
    return {**tokens, "pos_embed.weight": positions[rows:]}


# --- timm's Eva class: RoPE ViTs, EVA-02, DINOv3 --------------------------------------------


def rotary_settings(rope: nn.Module) -> tuple[int, dict]:
    """The head dimension and the ``TimmRotary2d`` settings (``ViTConfig.rotary``) of a timm ``Eva``
    model's ``rope`` module; ``ConfigError`` for a kind bcosvit does not reproduce."""
    name = type(rope).__name__
    if name == "RotaryEmbeddingCat":
        if getattr(rope, "grid_type", "index") != "index" or getattr(rope, "in_pixels", False):
            raise ConfigError("a RotaryEmbeddingCat on pixel coordinates (in_pixels) or another grid type")
        ref = rope.ref_feat_shape
        return int(rope.dim), {
            "rope_type": "cat",
            "rotate_half": bool(rope.rotate_half),
            "temperature": float(rope.temperature),
            "grid_indexing": rope.grid_indexing,
            "grid_offset": float(rope.grid_offset),
            "ref_grid": None if ref is None else [int(ref[0]), int(ref[1])],
        }
    if name == "RotaryEmbeddingDinoV3":
        periods = rope.min_period is not None and rope.max_period is not None
        if rope.temperature is None and not periods:
            raise ConfigError("a RotaryEmbeddingDinoV3 with neither a temperature nor min/max periods")
        return int(rope.dim), {
            "rope_type": "dinov3",
            "rotate_half": bool(rope.rotate_half),
            "temperature": 100.0 if rope.temperature is None else float(rope.temperature),  # unused with periods
            "grid_indexing": rope.grid_indexing,
            "grid_offset": float(rope.grid_offset),
            "normalize_coords": rope.normalize_coords,
            "min_period": float(rope.min_period) if periods else None,
            "max_period": float(rope.max_period) if periods else None,
        }
    if name == "RotaryEmbeddingMixed":
        settings = {"rope_type": "mixed", "temperature": float(rope.temperature), "num_heads": int(rope.num_heads)}
        return int(rope.dim) // int(rope.num_heads), {**settings, "grid_indexing": rope.grid_indexing}
    raise ConfigError(f"a rotary embedding {name}")


def rotary_from_timm(rope: nn.Module, num_prefix_tokens: int, block: int = 0) -> TimmRotary2d:
    """The ``TimmRotary2d`` computing block ``block``'s rotation of a timm ``Eva`` model's ``rope``
    (learned frequencies, RoPE-Mixed, are per block; fixed tables are recomputed in float64)."""
    head_dim, settings = rotary_settings(rope)
    module = TimmRotary2d(head_dim, num_prefix_tokens=num_prefix_tokens, **settings)
    if settings["rope_type"] == "mixed":  # in the timm model's dtype
        module.freqs = nn.Parameter(rope.freqs.detach()[:, block].clone(), requires_grad=rope.freqs.requires_grad)
    return module


def _check_eva_supported(model: nn.Module) -> None:
    problems = []
    patch = model.patch_embed
    if not _is(patch, "PatchEmbed") or not isinstance(patch.norm, nn.Identity):
        problems.append("a patch embedding other than timm's PatchEmbed without a norm")
    if model.dynamic_img_size and model.pos_embed is not None:
        problems.append("dynamic_img_size with learned positions (timm resamples them its own way)")
    if model.rope is not None:
        try:
            rotary_settings(model.rope)
        except ConfigError as exc:
            problems.append(str(exc))
    norms = (model.norm, model.fc_norm)
    if not all(isinstance(norm, nn.Identity | nn.LayerNorm) for norm in norms) or not isinstance(
        model.norm_pre, nn.Identity | nn.LayerNorm
    ):
        problems.append("norms other than LayerNorm")
    elif sum(isinstance(norm, nn.LayerNorm) for norm in norms) != 1:
        problems.append(
            "two final norms (norm and fc_norm)" if isinstance(model.norm, nn.LayerNorm) else "no final norm"
        )
    if model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={model.global_pool!r} (token or avg are supported for Eva)")
    if getattr(model, "attn_pool", None) is not None:
        problems.append("attention pooling")
    if not isinstance(model.head, nn.Identity | nn.Linear):
        problems.append(f"a head {type(model.head).__name__}")
    in_blocks: dict[str, list[int]] = {}
    for k, block in enumerate(model.blocks):
        for problem in _eva_block_problems(block, model):
            in_blocks.setdefault(problem, []).append(k)
    for problem, blocks in in_blocks.items():
        where = "every block" if len(blocks) == len(model.blocks) else "blocks " + ", ".join(map(str, blocks[:5]))
        problems.append(f"{problem} ({where})")
    if problems:
        raise ConfigError(
            f"this timm Eva model has {', '.join(sorted(set(problems)))}, which bcosvit models do not "
            "(what converts: docs/design.md#b-cosification)"
        )


def _eva_block_problems(block: nn.Module, model: nn.Module) -> list[str]:
    if not _is(block, "EvaBlock"):
        return [f"a {type(block).__name__} block (a post-norm or other block)"]
    problems = []
    attn, mlp = block.attn, block.mlp
    if not (_is(attn, "EvaAttention") or _is(attn, "AttentionRope")):
        problems.append(f"an attention of kind {type(attn).__name__}")
    else:
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            problems.append("an attention inner norm (scale_attn_inner)")
        if getattr(attn, "gate", None) is not None:
            problems.append("a gated attention")
        if not isinstance(attn.q_norm, nn.Identity | nn.LayerNorm):
            problems.append(f"query/key norms of kind {type(attn.q_norm).__name__}")
        if model.rope is not None and bool(getattr(attn, "rotate_half", False)) != bool(
            getattr(model.rope, "rotate_half", False)
        ):
            problems.append("an attention whose rotary layout differs from the model's rope")
        if getattr(attn, "num_prefix_tokens", model.num_prefix_tokens) != model.num_prefix_tokens:
            problems.append("an attention that skips another number of prefix tokens than the model has")
    if _is(mlp, "Mlp") or _is(mlp, "GluMlp") or _is(mlp, "SwiGLU"):
        if _activation_kind(mlp.act) is None:
            problems.append(f"MLP activation {type(mlp.act).__name__}")
        if not isinstance(mlp.norm, nn.Identity | nn.LayerNorm):
            problems.append(f"an MLP norm of kind {type(mlp.norm).__name__}")
        if _is(mlp, "GluMlp") and getattr(mlp, "chunk_dim", -1) != -1:
            problems.append("a gated MLP split along another axis")
    else:
        problems.append(f"an MLP of kind {type(mlp).__name__}")
    if not isinstance(block.norm1, nn.LayerNorm) or not isinstance(block.norm2, nn.LayerNorm):
        problems.append("norms other than LayerNorm")
    if (block.gamma_1 is None) != (block.gamma_2 is None):
        problems.append("LayerScale on one residual branch only")
    if _eva_block_layout(block) != _eva_block_layout(model.blocks[0]):
        problems.append("blocks of different layouts")
    return problems


def _eva_block_layout(block: nn.Module) -> tuple:
    attn, mlp = block.attn, block.mlp
    return (
        type(attn),
        attn.num_heads,
        type(attn.q_norm),
        type(mlp),
        _activation_kind(mlp.act),
        type(mlp.norm),
        mlp.fc2.in_features,
        block.gamma_1 is None,
        float(block.norm1.eps),
    )


def _eva_config(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> ViTConfig:
    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    reg_token = getattr(model, "reg_token", None)
    gated = not _is(mlp, "Mlp")
    return ViTConfig(
        **_shared_fields(model, mean, std),
        mlp_ratio=mlp.fc2.in_features / model.embed_dim,
        qkv_bias=_eva_qkv(attn)[1] is not None,
        reg_tokens=0 if reg_token is None else int(reg_token.shape[1]),
        layer_scale=block.gamma_1 is not None,
        act=None if gated else _activation_kind(mlp.act),
        mlp_gate=_activation_kind(mlp.act) if gated else None,
        mlp_norm=not isinstance(mlp.norm, nn.Identity),
        rotary=None if model.rope is None else rotary_settings(model.rope)[1],
    )


def _eva_qkv(attn: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The fused query/key/value weight ``(3D, D)`` and bias ``(3D,)`` (None: none) of an Eva attention:
    one ``qkv`` layer or three projections, with EVA's separate ``q_bias``/``v_bias`` (the key's is 0)."""
    qkv = getattr(attn, "qkv", None)
    if qkv is not None:
        weight, bias = qkv.weight, qkv.bias
    else:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight for p in projections])
        biases = [p.bias for p in projections]
        bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [
                    torch.zeros(p.out_features, dtype=weight.dtype) if b is None else b
                    for p, b in zip(projections, biases)
                ]
            )
        )
    if getattr(attn, "q_bias", None) is not None:
        extra = torch.cat([attn.q_bias, attn.k_bias.to(attn.q_bias), attn.v_bias])
        bias = extra if bias is None else bias + extra
    return weight, bias


def _eva_state(model: nn.Module, twin: VisionTransformer) -> dict[str, Tensor]:
    """``twin``'s state dict holding a timm Eva model's weights."""
    source = model.state_dict()
    state = dict(twin.state_dict())
    conv = source["patch_embed.proj.weight"]
    state["tokenizer.proj.weight"] = conv.permute(0, 2, 3, 1).flatten(1)
    state["tokenizer.proj.bias"] = source.get("patch_embed.proj.bias", torch.zeros(conv.shape[0], dtype=conv.dtype))
    state.update(_prefix_and_positions(model, source))
    for k, block in enumerate(model.blocks):
        state.update(_eva_block_state(block, f"blocks.{k}."))
        if twin.config.rotary is not None and twin.config.rotary["rope_type"] == "mixed":
            state[f"blocks.{k}.attn.rotary.freqs"] = model.rope.freqs.detach()[:, k]
    final_norm = "norm." if twin.config.final_norm == "tokens" else "fc_norm."
    for key, value in source.items():
        if key.startswith(("head.", "norm_pre.")):
            state[key] = value
        elif key.startswith(final_norm):
            state["norm." + key[len(final_norm) :]] = value
    expected = twin.state_dict()
    missing = sorted(k for k in expected if k not in state)
    if missing:
        raise ConfigError(f"the timm Eva model's weights do not fit the converted layout (missing {missing[:5]})")
    return {k: v.to(expected[k].dtype) for k, v in state.items() if k in expected}


def _eva_block_state(block: nn.Module, prefix: str) -> dict[str, Tensor]:
    attn, mlp = block.attn, block.mlp
    weight, bias = _eva_qkv(attn)
    state = {prefix + "attn.qkv.weight": weight, prefix + "attn.proj.weight": attn.proj.weight}
    if bias is not None:
        state[prefix + "attn.qkv.bias"] = bias
    if attn.proj.bias is not None:
        state[prefix + "attn.proj.bias"] = attn.proj.bias
    parts = {"norm1": block.norm1, "norm2": block.norm2, "attn.q_norm": attn.q_norm, "attn.k_norm": attn.k_norm}
    parts.update({"mlp.norm": mlp.norm, "mlp.fc2": mlp.fc2})
    for name, module in parts.items():
        state.update({f"{prefix}{name}.{key}": value for key, value in module.state_dict().items()})
    if _is(mlp, "SwiGLU"):  # separate gate and value projections: the gate's half first
        state[prefix + "mlp.fc1.weight"] = torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight])
        state[prefix + "mlp.fc1.bias"] = torch.cat([mlp.fc1_g.bias, mlp.fc1_x.bias])
    elif _is(mlp, "GluMlp") and mlp.gate_last:  # timm's packed halves (value, gate) -> (gate, value)
        state[prefix + "mlp.fc1.weight"] = torch.cat(mlp.fc1.weight.chunk(2)[::-1])
        state[prefix + "mlp.fc1.bias"] = torch.cat(mlp.fc1.bias.chunk(2)[::-1])
    else:
        state.update({f"{prefix}mlp.fc1.{key}": value for key, value in mlp.fc1.state_dict().items()})
    if block.gamma_1 is not None:
        state[prefix + "ls1.gamma"], state[prefix + "ls2.gamma"] = block.gamma_1, block.gamma_2
    return {key: value.detach() for key, value in state.items()}
