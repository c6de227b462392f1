"""Load the published B-cos-v2 ViT checkpoints (the reference package ``bcos`` 0.1.3) into bcosvit models.

The reference's ViTs (``bcos/models/vit.py``, lucidrains' simple ViT) compute the same function as
the registered ImageNet models of ``bcosvit.models.registry`` (docs/design.md#published-checkpoints):
only the parameter names differ, and the conv stem's final linear map, a ``(D, C)`` matrix on the
stem's tokens in the reference, is stored here as the ``(D, C, 1, 1)`` kernel of a 1×1 convolution.
B-cos checkpoints wrap the ViT in a sequential with a parameter-free logit layer (keys ``0.*``).

    reference (B-cos: prefixed "0.")                bcosvit
    to_patch_embedding.linear                       tokenizer.proj            (patch embedding)
    to_patch_embedding.conv_stem.{i}                tokenizer.stages.{i}      (conv stem)
    to_patch_embedding.linear                       tokenizer.stages.{3n}     (conv stem, n stages)
    transformer.encoder_{k}.attn.norm               blocks.{k}.norm1
    transformer.encoder_{k}.attn.to_qkv             blocks.{k}.attn.qkv
    transformer.encoder_{k}.attn.to_out             blocks.{k}.attn.proj
    transformer.encoder_{k}.ff.net.norm             blocks.{k}.norm2
    transformer.encoder_{k}.ff.net.linear{1,2}      blocks.{k}.mlp.fc{1,2}
    linear_head.norm                                norm
    linear_head.linear                              head

A B-cos linear or convolution layer of the reference keeps its weight one level down
(``<layer>.linear.weight``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, InputError
from ..fileio import open_regular_file
from ..layers import BcosConv2d, BcosLinear
from ..models.registry import model_config
from ..models.vit import VisionTransformer
from .checkpoint import check_shapes
from .imagenet import imagenet_class_names
from .published import CONVERTIBLE, OFFICIAL_NAMES

# Bumped whenever the mapping or the numerics of a converted model change: cached conversions
# written by another version are converted again (bcosvit.weights.hub).
CONVERSION_VERSION = 1

# A published file holds at most ViT-L (0.3 G values, 1.2 GB); refuse anything far larger before reading it.
MAX_CHECKPOINT_BYTES = 4 * 2**30
_BCOS_WRAPPER_PREFIX = "0."

_BLOCK_PARTS = {
    "norm1": "attn.norm",
    "attn.qkv": "attn.to_qkv",
    "attn.proj": "attn.to_out",
    "norm2": "ff.net.norm",
    "mlp.fc1": "ff.net.linear1",
    "mlp.fc2": "ff.net.linear2",
}


def official_key(key: str, model: VisionTransformer) -> str | None:
    """The reference's name for the state-dict entry ``key`` of ``model`` (None: an entry the
    reference does not store, such as the standard twin's input normalisation)."""
    module_path, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_path)
    if isinstance(module, BcosLinear | BcosConv2d):
        leaf = f"linear.{leaf}"
    mapped = _official_module(module_path, model)
    if mapped is None:
        return None
    prefix = _BCOS_WRAPPER_PREFIX if model.is_bcos else ""
    return f"{prefix}{mapped}.{leaf}"


def _official_module(path: str, model: VisionTransformer) -> str | None:
    if path == "tokenizer.proj":
        return "to_patch_embedding.linear"
    if match := re.fullmatch(r"tokenizer\.stages\.(\d+)", path):
        index = int(match.group(1))
        last = len(model.tokenizer.stages) - 1
        return "to_patch_embedding.linear" if index == last else f"to_patch_embedding.conv_stem.{index}"
    if match := re.fullmatch(r"blocks\.(\d+)\.(.+)", path):
        part = _BLOCK_PARTS.get(match.group(2))
        return None if part is None else f"transformer.encoder_{match.group(1)}.{part}"
    return {"norm": "linear_head.norm", "head": "linear_head.linear"}.get(path)


def official_shapes(model: VisionTransformer) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a reference checkpoint of ``model``'s configuration holds, by reference name."""
    shapes = {}
    for key, value in model.state_dict().items():
        name = official_key(key, model)
        if name is not None:
            shape = tuple(value.shape)
            # the stem's final 1×1 kernel (D, C, 1, 1) is a (D, C) matrix in the reference
            shapes[name] = shape[:2] if ".to_patch_embedding.linear." in f".{name}" else shape
    return shapes


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a reference ``.pth`` file, read without pickle (``weights_only=True``).

    Only regular files of at most ``MAX_CHECKPOINT_BYTES`` are read, and every tensor must store
    its values: a crafted tensor of stride 0 (shape (10^8, 192) over 192 stored values) would make
    the model built from it as large as its shape, not its file.
    """
    path = Path(path)
    try:
        with open_regular_file(path, "checkpoint file", "pass the .pth file, not a folder") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_CHECKPOINT_BYTES:
                raise CheckpointError(
                    f"checkpoint {path} is {size:,} bytes, more than any published B-cos ViT "
                    f"({MAX_CHECKPOINT_BYTES:,}); it is not one of them"
                )
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:  # corrupt zip, truncated file, or objects weights_only refuses
                raise CheckpointError(
                    f"checkpoint {path} is corrupt or not a plain PyTorch state dict ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); download it again"
                ) from exc
    except InputError as exc:
        raise CheckpointError(f"cannot read checkpoint: {exc}") from exc
    return _check_state_dict(state, str(path))


def _check_state_dict(state: object, source: str) -> dict[str, Tensor]:
    tensors_by_name = isinstance(state, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    )
    if not tensors_by_name:
        raise CheckpointError(f"{source} is not a state dict (a mapping of parameter names to tensors)")
    for key, value in state.items():
        stored = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
        if value.numel() * value.element_size() > stored:
            raise CheckpointError(
                f"{source}: tensor {key!r} claims shape {tuple(value.shape)} but stores only {stored:,} bytes "
                "(a tensor with repeated strides); a published checkpoint stores every value: this file is crafted"
            )
    return dict(state)


def _num_classes(state: Mapping[str, Tensor]) -> int | None:
    for key in ("linear_head.linear.weight", "linear_head.linear.linear.weight"):
        for prefix in ("", _BCOS_WRAPPER_PREFIX):
            if prefix + key in state and state[prefix + key].ndim == 2:
                return int(state[prefix + key].shape[0])
    return None


def _skeleton(name: str, num_classes: int | None) -> VisionTransformer:
    try:
        config = model_config(name, num_classes=num_classes)
    except ConfigError as exc:
        raise CheckpointError(
            f"the checkpoint's head has {num_classes} classes, which bcosvit cannot build: {exc}"
        ) from exc
    with torch.device("meta"):
        return VisionTransformer(config)


def match_official(state: Mapping[str, Tensor], name: str | None = None, source: str = "the checkpoint") -> str:
    """The bcosvit name whose configuration the reference state dict ``state`` fits.

    With ``name``, only that configuration is tried. ``CheckpointError`` names the missing,
    unexpected and differently shaped tensors against the closest configuration.
    """
    if name is not None and name not in CONVERTIBLE:
        raise ConfigError(f"{name!r} has no published reference checkpoint; convertible names: {list(CONVERTIBLE)}")
    found = {k: tuple(v.shape) for k, v in state.items()}
    num_classes = _num_classes(state)
    best: tuple[int, str, dict] | None = None
    for candidate in [name] if name is not None else CONVERTIBLE:
        expected = official_shapes(_skeleton(candidate, num_classes))
        if expected == found:
            return candidate
        distance = len(set(expected) ^ set(found)) + sum(expected[k] != found[k] for k in set(expected) & set(found))
        if best is None or distance < best[0]:
            best = (distance, candidate, expected)
    _, closest, expected = best
    check_shapes(expected, found, Path(source), f"{closest} (the closest published configuration)")
    raise AssertionError("unreachable: check_shapes raises on any difference")


def convert_official(checkpoint: str | Path | Mapping[str, Tensor], name: str | None = None) -> VisionTransformer:
    """The bcosvit model holding a published B-cos-v2 ViT checkpoint's weights (eval mode, float32).

    Args:
        checkpoint: a reference ``.pth`` file (read with ``weights_only=True``) or its state dict.
        name: the bcosvit name (``CONVERTIBLE``); None infers it from the tensor shapes.

    1000-class models get ImageNet's class names. ``CheckpointError``: a file that is corrupt,
    not a state dict, or fits no published configuration (naming the keys and shapes that differ).
    """
    if isinstance(checkpoint, Mapping):
        state = _check_state_dict(checkpoint, "the state dict")
        source = "the state dict"
    else:
        state = read_official_checkpoint(checkpoint)
        source = str(checkpoint)
    name = match_official(state, name, source)
    config = model_config(name, num_classes=_num_classes(state))
    if config.num_classes == 1000:
        config.class_names = imagenet_class_names()
    model = VisionTransformer(config)
    converted = {}
    for key, value in model.state_dict().items():
        official = official_key(key, model)
        converted[key] = value if official is None else state[official].reshape(value.shape).to(value.dtype)
    model.load_state_dict(converted)
    return model.eval()


__all__ = [
    "CONVERSION_VERSION",
    "CONVERTIBLE",
    "OFFICIAL_NAMES",
    "convert_official",
    "match_official",
    "official_key",
    "official_shapes",
    "read_official_checkpoint",
]
