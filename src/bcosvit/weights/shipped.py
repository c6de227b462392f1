"""Weights shipped inside the package (``bcosvit/weights/shipped/<name>.safetensors`` + ``.json``),
loaded offline by ``create_model(name, pretrained=True)``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from ..models.registry import model_config
from .checkpoint import load_model, read_metadata, resolve_weights, save_weights

SHIPPED = "shipped"  # create_model(name, pretrained=SHIPPED) (or True): these weights
# the metadata fields of a training run that a shipped copy keeps (its provenance)
_KEPT_FIELDS = ("model_name", "classes", "epoch", "metrics", "ema", "precision", "train_config")


def shipped_dir() -> Path:
    """The folder of weights shipped inside the package."""
    return Path(str(resources.files(__package__) / "shipped"))


def shipped_path(name: str) -> Path:
    """Where the shipped weights of ``name`` are (or would be): ``shipped_dir()/<name>.safetensors``."""
    return shipped_dir() / f"{name}.safetensors"


def list_pretrained() -> list[str]:
    """Names of models whose trained weights ship inside the package (``create_model(name, pretrained=True)``).

    ``bcosvit.list_pretrained_weights()`` lists these and the published ImageNet weights
    (``pretrained="imagenet"``), each with whether it is on this machine or would be downloaded.
    """
    folder = shipped_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.safetensors") if p.with_suffix(".json").exists())


def load_shipped(name: str, **overrides):
    """The shipped weights of ``name`` (``list_pretrained()``), loaded offline; ``overrides`` as
    ``load_model`` takes them (the input size alone may change)."""
    model_config(name)  # unknown names fail with a suggestion
    if name not in list_pretrained():
        raise ConfigError(
            f"no shipped weights for {name!r}; models with weights: {list_pretrained() or 'none'}. "
            "Train one with `bcosvit train` and load it with bcosvit.load_model(run_folder)"
        )
    return load_model(shipped_path(name), **overrides)


def ship_weights(run: str | Path, name: str | None = None, dest: str | Path | None = None) -> Path:
    """Copy a finished run's weights into the package (``bcosvit/weights/shipped/<name>.safetensors`` +
    ``.json``) so ``create_model(name, pretrained=True)`` loads them offline. Returns the weights path.

    ``name``: the registered name to ship them as (default: the run's model); ``dest``: another folder.
    """
    source = resolve_weights(run)
    meta = read_metadata(source)
    name = name or meta.get("model_name")
    if not isinstance(name, str):
        raise ConfigError(f"{source} names no model (model_name); pass the registered name to ship it as")
    model_config(name)  # must be a registered name
    model = load_model(source)  # proves the files load before they are shipped
    folder = Path(dest) if dest is not None else shipped_dir()
    keep = {k: meta[k] for k in _KEPT_FIELDS if k in meta}
    return save_weights(model, folder / f"{name}.safetensors", {**keep, "model_name": name, "shipped_from": str(run)})
