"""bcosvit models on the Hugging Face hub: ``from_pretrained``, ``save_pretrained`` and ``push_to_hub``
through ``huggingface_hub``'s ``PyTorchModelHubMixin``.

A hub repository (or a local folder) of a bcosvit model holds::

    config.json         the architecture, ``ViTConfig.to_dict()`` (class names included)
    model.safetensors   the weights, the model's ``state_dict`` (safetensors only: no pickle is read)
    README.md           the model card: architecture, classes, preprocessing, how to explain it

``HubVisionTransformer`` is a ``VisionTransformer`` with the mixin's methods
(``HubVisionTransformer.from_pretrained("org/name")``, ``model.save_pretrained(folder)``,
``model.push_to_hub("org/name")``); the functions ``from_pretrained``, ``save_pretrained`` and
``push_to_hub`` take any ``VisionTransformer`` (``create_model``, ``load_model``, a trained run).

Loading is checked before a model is built, with the weights wing's own checks
(``bcosvit.weights.checkpoint``): ``config.json`` is read bounded in size, with repeated keys
refused, and validated by ``ViTConfig.from_dict`` (which bounds the architecture's size); the
tensor shapes are read from the safetensors header and compared with the architecture built on the
"meta" device (no memory); only then is the model allocated and loaded. Every failure is a
``CheckpointError`` naming the file. The mixin's own ``from_pretrained`` is not used for this: it
``json.load``s ``config.json`` unbounded, decodes a dataclass by dropping unknown keys without
validation, and falls back to a pickled ``pytorch_model.bin``.

``huggingface_hub`` is optional: this module imports it at import time and, where it cannot,
``HubVisionTransformer`` is built on a stand-in whose hub methods raise ``ConfigError`` saying
``pip install huggingface_hub`` (the models, and ``import bcosvit``, never need it;
``bcosvit.from_pretrained`` and friends import this module on first use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, write_json
from ..models.vit import VisionTransformer, ViTConfig
from .checkpoint import (
    _check_model_size,
    _meta_model,
    check_shapes,
    load_state_dict,
    read_json_file,
    read_weights_header,
    trained_config,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLED_WEIGHTS_NAME = "pytorch_model.bin"  # what the mixin would fall back to; never read here
CARD_CLASS_NAMES = 20  # class names listed on the model card (all of them are in config.json)

try:
    from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess (tests/test_hf_hub.py)
    HUB_IMPORT_ERROR: ImportError | None = exc
else:
    HUB_IMPORT_ERROR = None


def hub_available() -> bool:
    """Whether ``huggingface_hub`` (with its mixin) could be imported."""
    return HUB_IMPORT_ERROR is None


def _hub_missing() -> ConfigError:
    return ConfigError(
        f"the Hugging Face hub needs huggingface_hub, which cannot be imported ({HUB_IMPORT_ERROR}): "
        "pip install huggingface_hub"
    )


class _HubUnavailable:
    """Stands in for ``PyTorchModelHubMixin`` where ``huggingface_hub`` cannot be imported: the class
    is defined as usual and every hub method raises ``ConfigError`` saying what to install."""

    def __init_subclass__(cls, **mixin_options: Any) -> None:
        super().__init_subclass__()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        raise _hub_missing()

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        raise _hub_missing()

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        raise _hub_missing()


_MixinBase: type = PyTorchModelHubMixin if HUB_IMPORT_ERROR is None else _HubUnavailable

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Architecture

`bcosvit.ViTConfig`, stored in `config.json` ({{ parameters }} parameters):

{{ architecture }}

## Classes

{{ classes }}

## Preprocessing

{{ preprocessing }}

## Use

```python
import bcosvit

model = bcosvit.from_pretrained("{{ repo_id }}")  # config.json validated, model.safetensors only
images = bcosvit.load_image("image.jpg", model)  # (1, C, H, W) in [0, 1], resized and cropped as above
logits = model(images)
{{ explain_line }}
```

Saved with `bcosvit` through `huggingface_hub`'s `PyTorchModelHubMixin`.
"""


class HubVisionTransformer(
    VisionTransformer,
    _MixinBase,
    library_name="bcosvit",
    tags=["bcos", "explainable-ai", "interpretability", "vision-transformer", "image-classification"],
    pipeline_tag="image-classification",
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """A ``VisionTransformer`` with ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``
    (huggingface_hub's ``PyTorchModelHubMixin``; files and checks: the module's docstring).

    Built like its base, ``HubVisionTransformer(config)``; ``as_hub_model(model)`` gives an existing
    model these methods. Inputs and outputs are those of ``VisionTransformer``: images
    ``(N, C, H, W)`` in [0, 1] -> logits ``(N, num_classes)``.
    """

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (the mixin adds
        ``README.md``; it keeps a ``config.json`` written here)."""
        write_hub_files(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        image_size: int | None = None,
    ) -> HubVisionTransformer:
        """The model in a local folder or a hub repository ``"org/name"`` (a folder that exists wins),
        in eval mode, on ``map_location``, in ``dtype`` (None: torch's default dtype, as
        ``load_model``). ``image_size`` may change the input size (the weights do not depend on it).

        The hub arguments are ``hf_hub_download``'s (offline: ``HF_HUB_OFFLINE=1`` or
        ``local_files_only``, from the hub cache). ``CheckpointError`` for a missing, corrupt,
        invalid or mismatched file, or a repository that cannot be reached or has no safetensors."""
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            map_location=map_location,
            dtype=dtype,
            image_size=image_size,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        image_size: int | None = None,
    ) -> HubVisionTransformer:
        """The mixin's loading hook: fetch (or find) the two files, then ``load_hub_files``."""
        config_path, weights_path = hub_files(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        model = load_hub_files(config_path, weights_path, image_size=image_size, dtype=dtype, model_class=cls)
        return model.to(map_location)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """The mixin's ``push_to_hub`` (creates the repository if needed and uploads ``config.json``,
        ``model.safetensors`` and ``README.md`` in one commit), with ``repo_id`` on the model card.
        Returns the commit's URL."""
        card = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The model card (``README.md``): the mixin's card data (library, tags; the pipeline
        ``image-feature-extraction`` for a headless backbone) and ``MODEL_CARD_TEMPLATE`` filled by
        ``model_card_values``; ``kwargs`` (``model_card_kwargs``) override the values."""
        info = self._hub_mixin_info
        data = info.model_card_data.to_dict()
        if not self.num_classes:
            data["pipeline_tag"] = "image-feature-extraction"
        values = {**model_card_values(self), **kwargs}
        return ModelCard.from_template(ModelCardData(**data), template_str=info.model_card_template, **values)


def as_hub_model(model: VisionTransformer) -> HubVisionTransformer:
    """``model`` with the hub methods: a ``HubVisionTransformer`` sharing its parameters, buffers and
    sub-modules (no copy; ``model`` itself when it already is one). ``ConfigError`` for anything but
    a bcosvit ``VisionTransformer`` (unwrap DistributedDataParallel / ``torch.compile`` first)."""
    if isinstance(model, HubVisionTransformer):
        return model
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"expected a bcosvit VisionTransformer, got {type(model).__name__}; unwrap it first (model.module)"
        )
    hub = HubVisionTransformer.__new__(HubVisionTransformer, model.config)
    hub.__dict__.update(model.__dict__)
    return hub


def from_pretrained(pretrained_model_name_or_path: str | Path, **kwargs: Any) -> HubVisionTransformer:
    """``HubVisionTransformer.from_pretrained``: a bcosvit model from a local folder or a hub repository."""
    return HubVisionTransformer.from_pretrained(pretrained_model_name_or_path, **kwargs)


def save_pretrained(model: VisionTransformer, save_directory: str | Path, **kwargs: Any) -> str | None:
    """Write ``model`` to ``save_directory`` as a hub repository (``config.json``,
    ``model.safetensors``, ``README.md``): the mixin's ``save_pretrained`` (``push_to_hub=True``
    also pushes). An existing ``README.md`` is kept, as the mixin does."""
    return as_hub_model(model).save_pretrained(save_directory, **kwargs)


def push_to_hub(model: VisionTransformer, repo_id: str, **kwargs: Any) -> str:
    """Upload ``model`` to the hub repository ``repo_id`` (``HubVisionTransformer.push_to_hub``)."""
    return as_hub_model(model).push_to_hub(repo_id, **kwargs)


# --- files ---------------------------------------------------------------------------------


def write_hub_files(model: VisionTransformer, folder: str | Path) -> tuple[Path, Path]:
    """``config.json`` (the architecture) and ``model.safetensors`` (the weights, on the CPU, in the
    model's dtype) in ``folder``, each written atomically. Returns their paths."""
    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return write_json(folder / CONFIG_NAME, model.config.to_dict()), weights


def read_hub_config(path: Path) -> dict[str, Any]:
    """The JSON object in ``config.json`` (bounded in size, repeated keys refused); ``CheckpointError``
    for a file that is missing, not a regular file, too large or not such an object."""
    data = read_json_file(path, "config file", "config.json", "save the model again")
    if not isinstance(data, dict):
        raise CheckpointError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_hub_files(
    config_path: str | Path,
    weights_path: str | Path,
    *,
    image_size: int | None = None,
    dtype: torch.dtype | None = None,
    model_class: type[VisionTransformer] = HubVisionTransformer,
) -> VisionTransformer:
    """The model of ``config.json`` with the weights of ``model.safetensors``, in eval mode.

    Checked first, nothing allocated until then: the config (``read_hub_config``,
    ``ViTConfig.from_dict`` through ``trained_config``: only ``image_size`` may be changed), then the
    weights' header against the architecture built on the "meta" device (``check_shapes``, the size
    bound). ``dtype``: the model's (None: torch's default). ``CheckpointError`` naming the file."""
    config_path, weights_path = Path(config_path), Path(weights_path)
    architecture = read_hub_config(config_path)
    try:
        config: ViTConfig = trained_config(architecture, {"image_size": image_size})
    except ConfigError as exc:
        raise CheckpointError(f"config file {config_path}: invalid architecture: {exc}") from exc
    shapes, _ = read_weights_header(weights_path)
    skeleton = _meta_model(config, config_path, len(shapes))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    check_shapes(expected, shapes, weights_path, f"the architecture in {config_path.name}")
    _check_model_size(skeleton, config_path)
    model = model_class(config)
    if dtype is not None:
        model.to(dtype)
    load_state_dict(model, weights_path)
    return model.eval()


def hub_files(
    model_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> tuple[Path, Path]:
    """The paths of ``config.json`` and ``model.safetensors``: in the folder ``model_id`` when it is
    one, else fetched from the hub repository ``model_id`` (or found in the hub cache) by
    ``hf_hub_download``. ``CheckpointError`` says which file is missing and why."""
    folder = Path(model_id)
    if folder.is_dir():
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).exists():
                raise CheckpointError(f"folder {folder} has no {name}; {_what_a_repo_holds(folder / name)}")
        return folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not hub_available():
        raise _hub_missing()
    options = {
        "revision": revision,
        "cache_dir": cache_dir,
        "force_download": force_download,
        "local_files_only": local_files_only,
        "token": token,
    }
    return _download(model_id, CONFIG_NAME, options), _download(model_id, WEIGHTS_NAME, options)


def _download(repo_id: str, filename: str, options: dict[str, Any]) -> Path:
    where = f"{filename} of {repo_id!r}"
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, **options))
    except HFValidationError as exc:
        raise CheckpointError(
            f"{repo_id!r} is neither a folder nor a Hugging Face repository id ('org/name'): {exc}"
        ) from None
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{where} is not in the local hub cache and cannot be downloaded now (offline: HF_HUB_OFFLINE or "
            f"local_files_only): {_first_line(exc)}"
        ) from None
    except EntryNotFoundError:
        raise CheckpointError(f"the repository {repo_id!r} has no {filename}; {_what_a_repo_holds(None)}") from None
    except (HfHubHTTPError, OfflineModeIsEnabled) as exc:
        raise CheckpointError(f"cannot fetch {where} from the Hugging Face hub: {_first_line(exc)}") from None


def _what_a_repo_holds(missing: Path | None) -> str:
    text = f"a bcosvit model is {CONFIG_NAME} + {WEIGHTS_NAME} (save_pretrained writes them)"
    if missing is not None and missing.name == WEIGHTS_NAME and (missing.parent / PICKLED_WEIGHTS_NAME).exists():
        return f"{text}; a pickled {PICKLED_WEIGHTS_NAME} is never loaded (safetensors only)"
    return text if missing is not None else f"{text}; pickled weights are never loaded (safetensors only)"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --- the model card ------------------------------------------------------------------------

_CARD_CORE = ("bcos", "image_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads")


def model_card_values(model: VisionTransformer) -> dict[str, str]:
    """The values ``MODEL_CARD_TEMPLATE`` is filled with: the title, what family the model is and how
    it is explained, the architecture (the core options and every other one that differs from its
    default), the classes, the preprocessing (``pretrained_cfg``) and the parameter count."""
    config = model.config
    defaults = ViTConfig()
    options = {k: v for k, v in config.to_dict().items() if k != "class_names"}
    shown = [k for k in options if k in _CARD_CORE or options[k] != getattr(defaults, k)]
    rows = "\n".join(f"| `{k}` | `{json.dumps(options[k])}` |" for k in shown)
    family = "B-cos" if model.is_bcos else "standard"
    grid = config.image_size // config.patch_size
    title = f"bcosvit {family} ViT: {config.embed_dim}-wide, {config.depth} blocks, patch {config.patch_size}"
    if model.is_bcos:
        summary = (
            f"A B-cos Vision Transformer (`bcosvit`, B-cos exponent b = {config.b}): a dynamic linear model, "
            "`logit = w(x)·x + positional + logit_bias`, whose explanation `w(x)` is exact and complete. "
            "Explain it with `bcosvit.explain(model, images, targets)`."
        )
        explain_line = "explanation = bcosvit.explain(model, images, logits.argmax(1))  # exact: w(x)·x"
    else:
        summary = (
            "The standard (not B-cos) twin of a bcosvit B-cos ViT: the same shapes, ordinary layers. "
            "Explain it post hoc with `bcosvit.attribution.attribute`; `bcosvit.bcosify(model)` converts it."
        )
        explain_line = 'maps = bcosvit.attribution.attribute("integrated_gradients", model, images, logits.argmax(1))'
    return {
        "title": title,
        "summary": summary,
        "architecture": f"| option | value |\n|---|---|\n{rows}\n\n{grid}×{grid} tokens at {config.image_size} px.",
        "parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M",
        "classes": _card_classes(config),
        "preprocessing": _card_preprocessing(model),
        "repo_id": "ORG/NAME",
        "explain_line": explain_line,
    }


def _card_classes(config: ViTConfig) -> str:
    if not config.num_classes:
        return "None: a headless backbone; the output is the pooled features `(N, embed_dim)`."
    if not config.class_names:
        return f"{config.num_classes} classes, unnamed (`class_names` is null in `config.json`)."
    names = ", ".join(f"`{name}`" for name in config.class_names[:CARD_CLASS_NAMES])
    more = (
        f", … (all {config.num_classes} in `config.json`, `class_names`)"
        if config.num_classes > CARD_CLASS_NAMES
        else ""
    )
    return f"{config.num_classes} classes (`class_names` in `config.json`, in logit order): {names}{more}."


def _card_preprocessing(model: VisionTransformer) -> str:
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "label_names"}  # the names are listed above
    config = model.config
    resize = config.resize_size or config.image_size
    if model.is_bcos:
        encoding = "`[x, 1 - x]` (its input encoding: 2·C channels)"
    else:
        encoding = f"`(x - mean) / std` with mean `{list(cfg['input_mean'])}`, std `{list(cfg['input_std'])}`"
    return (
        f"Images with values in [0, 1], {config.in_chans} channel(s): the shorter side resized to {resize} px "
        f"(bilinear, antialiased), the centre {config.image_size}×{config.image_size} crop. No mean/std "
        f"normalisation: the model encodes its input itself, {encoding}. `bcosvit.transforms(model)` is this "
        "pipeline, and timm's `create_transform(**resolve_model_data_config(model))` builds it from the "
        f"model's `pretrained_cfg`:\n\n```json\n{json.dumps(cfg)}\n```"
    )
