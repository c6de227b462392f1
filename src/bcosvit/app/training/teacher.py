"""Teachers: trained standard ViTs that a run B-cosifies (``bcosify_from``, Arya et al., NeurIPS
2024) or aligns its student to (``align_to``, ALOE: Maser et al., CVPR 2026).

A teacher source is a run folder or ``.safetensors`` file, a registered name with shipped weights,
or a timm model, ``timm:NAME`` (``TimmSource``): ``timm.create_model(NAME, **kwargs)`` converted
into its bcosvit standard twin (``bcosvit.bcosification.from_timm``, checked to compute timm's
logits), its weights read from a local file (``weights=``, the command line's ``--weights``) or
from the user's own timm / Hugging Face cache. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import torch
from torch import Tensor, nn

from ...bcosification import bcosify, from_timm, remove_biases, set_b
from ...errors import CheckpointError, ConfigError, InputError
from ...fileio import open_regular_file
from ...models.registry import BCOS_PREFIX, list_models, twin_name
from ...models.vit import VisionTransformer
from ...weights import load_weights, weights_metadata
from ...weights.checkpoint import check_shapes

TIMM_PREFIX = "timm:"
# the model name a run records for the B-cos twin of a timm teacher: no registered name, the
# architecture comes from the converted teacher (its model.json "architecture" says which)
TEACHER_FAMILY_PREFIX = BCOS_PREFIX + TIMM_PREFIX
# timm.create_model arguments that choose where weights come from: here --weights or the cache do
_LOADING_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
# a weights file may hold the model's values in float64 or a training checkpoint around them (optimizer
# moments, an EMA): at most this many times the model's bytes in float32 (plus _WEIGHTS_SLACK), checked first
MAX_WEIGHTS_FACTOR = 5
_WEIGHTS_SLACK = 64 * 2**20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_QUOTE_SAFE = '/:,[]{}"@+!*()~'  # kept as they are in a recorded source; & = ? # % and blanks are escaped


@dataclasses.dataclass(frozen=True)
class TimmSource:
    """A timm teacher, written ``timm:NAME`` or ``timm:NAME?KEY=VALUE&...``.

    ``NAME`` is a timm model name, with a pretrained tag or not (``vit_small_patch16_224.augreg_in1k``);
    each ``KEY=VALUE`` is a keyword argument of ``timm.create_model`` (``img_size=224``,
    ``num_classes=0``; VALUE read as JSON where it is JSON, else as text), except three of bcosvit's:

    - ``weights=PATH``: the weights file (``--weights``), else timm's pretrained weights from the cache;
    - ``sha256=HEX``: that file's SHA-256, recorded by the run (a changed file is refused);
    - ``features=true``: only the teacher's features are used (``--teacher-features``): the student
      B-cosified from it gets a fresh head for the dataset's classes.

    ``str()`` is the canonical form a run records: keyword arguments sorted, then those three.
    """

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None
    sha256: str | None = None
    features: bool = False

    @classmethod
    def parse(cls, source: str) -> TimmSource:
        """The source ``timm:NAME[?KEY=VALUE&...]``; ``ConfigError`` naming what is malformed."""
        if not is_timm_source(source):
            raise ConfigError(f"{source!r} is no timm teacher (timm:NAME)")
        name, _, query = source[len(TIMM_PREFIX) :].partition("?")
        if not name.strip() or name != name.strip():
            raise ConfigError(
                f"teacher {source!r}: timm: needs a model name, e.g. timm:vit_small_patch16_224.augreg_in1k"
            )
        items: dict[str, str] = {}
        for part in query.split("&") if query else []:
            key, equals, text = part.partition("=")
            key = unquote(key)
            if not equals or not key.isidentifier():
                raise ConfigError(f"teacher {source!r}: expected KEY=VALUE after '?' (joined by '&'), got {part!r}")
            if key in items:
                raise ConfigError(f"teacher {source!r}: {key} is given twice")
            items[key] = unquote(text)
        weights, sha256, features = items.pop("weights", None), items.pop("sha256", None), items.pop("features", None)
        if weights == "":
            raise ConfigError(f"teacher {source!r}: weights= needs the path of a weights file")
        if sha256 is not None and (weights is None or not _SHA256.fullmatch(sha256)):
            raise ConfigError(f"teacher {source!r}: sha256= is the 64 hex digits of the weights= file's SHA-256")
        if features not in (None, "true", "false"):
            raise ConfigError(f"teacher {source!r}: features= is true or false, got {features!r}")
        loading = sorted(set(items) & set(_LOADING_KWARGS))
        if loading:
            raise ConfigError(
                f"teacher {source!r}: {loading} choose where timm reads weights; bcosvit reads them from "
                "--weights FILE (weights=) or from the timm / Hugging Face cache"
            )
        kwargs = {key: _value(text) for key, text in items.items()}
        return cls(name, kwargs, weights, sha256, features == "true")

    def __str__(self) -> str:
        parts = [f"{key}={_quote(_text(value))}" for key, value in sorted(self.kwargs.items())]
        if self.features:
            parts.append("features=true")
        if self.weights is not None:
            parts.append(f"weights={_quote(self.weights)}")
        if self.sha256 is not None:
            parts.append(f"sha256={self.sha256}")
        return TIMM_PREFIX + self.name + ("?" + "&".join(parts) if parts else "")

    @property
    def label(self) -> str:
        """``timm:NAME``, for messages."""
        return TIMM_PREFIX + self.name

    def call(self) -> str:
        """The ``timm.create_model`` call this source makes (without ``pretrained``), for messages."""
        arguments = [repr(self.name), *(f"{key}={value!r}" for key, value in sorted(self.kwargs.items()))]
        return f"timm.create_model({', '.join(arguments)})"


def _value(text: str) -> Any:
    """A keyword argument's value: JSON where ``text`` is JSON (``224``, ``true``, ``[0.5, 0.5]``), else ``text``."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def _text(value: Any) -> str:
    """The text ``_value`` reads back as ``value``."""
    if isinstance(value, str):
        return value if _value(value) == value and not _is_json(value) else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _quote(text: str) -> str:
    return quote(text, safe=_QUOTE_SAFE)


def is_timm_source(source: object) -> bool:
    """Whether ``source`` names a timm teacher (``timm:NAME``)."""
    return isinstance(source, str) and source.startswith(TIMM_PREFIX)


def teacher_features(source: object) -> bool:
    """Whether the teacher ``source`` is used for its features alone (``timm:NAME?features=true``,
    ``bcosvit align --teacher-features``)."""
    return is_timm_source(source) and TimmSource.parse(str(source)).features


def teacher_source(source: str, weights: str | Path | None = None, features: bool = False) -> str:
    """The source a run records for the teacher ``source``: a timm teacher in canonical form
    (``TimmSource``), its weights file (``weights``, the command line's ``--weights``, else the
    source's own ``weights=``) made absolute and its SHA-256 added; any other source unchanged.
    ``features``: only the teacher's features are used (``--teacher-features``)."""
    if not is_timm_source(source):
        if weights is not None:
            raise ConfigError(
                f"--weights {weights} is the weights file of a timm teacher (timm:NAME); {source!r} is not one "
                "(a run folder, weights file or shipped name brings its own weights)"
            )
        if features:
            raise ConfigError(
                f"--teacher-features is for a timm teacher (timm:NAME) without a head; {source!r} is a bcosvit "
                "model, which has one"
            )
        return source
    spec = TimmSource.parse(source)
    if weights is not None:
        path = os.path.abspath(weights)
        if spec.weights is not None and os.path.abspath(spec.weights) != path:
            raise ConfigError(f"teacher {source!r} names weights={spec.weights} and --weights {weights}: give one")
        spec = dataclasses.replace(spec, weights=path)
    if features:
        spec = dataclasses.replace(spec, features=True)
    if spec.weights is not None:
        spec = dataclasses.replace(spec, weights=os.path.abspath(spec.weights))
        if spec.sha256 is None:
            spec = dataclasses.replace(spec, sha256=weights_sha256(spec.weights, spec.label))
    return str(spec)


def resolve_teacher_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (training options by name) with their timm teachers (``bcosify_from``,
    ``align_to``) as a run records them (``teacher_source``: the weights file's absolute path and
    SHA-256) and, where ``image_size`` is unset, the first one's input size: the dataset's images
    are resized to what the teacher reads. Other settings are returned as they are."""
    resolved = dict(settings)
    timm_keys = [key for key in ("bcosify_from", "align_to") if is_timm_source(resolved.get(key))]
    for key in timm_keys:
        resolved[key] = teacher_source(resolved[key])
    if timm_keys and resolved.get("image_size") is None:
        resolved["image_size"] = teacher_input(resolved[timm_keys[0]])[1]
    return resolved


# --- reading a timm teacher -------------------------------------------------------------------


def _import_timm():
    """The ``timm`` module; ``ConfigError`` saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError("a timm teacher (timm:NAME) needs timm, which is not installed: pip install timm") from None
    return timm


def _check_timm_name(timm, spec: TimmSource) -> None:
    """``ConfigError`` for a name timm does not know, with the closest names it does (or the
    pretrained tags of a known model with an unknown tag)."""
    if spec.name.startswith(("hf-hub:", "local-dir:")):
        return  # timm reads these itself (from the cache or the folder)
    architecture, _, tag = spec.name.partition(".")
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"teacher {spec.label}: timm has no model {architecture!r}{hint} (timm.list_models('*vit*') lists its ViTs)"
        )
    if tag:
        tags = timm.list_pretrained(f"{architecture}.*")
        if spec.name not in tags:
            shown = ", ".join(tags[:8]) + (f" and {len(tags) - 8} more" if len(tags) > 8 else "")
            raise ConfigError(
                f"teacher {spec.label}: timm's {architecture} has no pretrained tag {tag!r}"
                + (f"; its tags: {shown}" if tags else "")
            )


class _DownloadRefusedError(RuntimeError):
    """What a download timm tried inside ``_offline`` raises."""


def _refuse_download(url: str, *args: Any, **kwargs: Any) -> None:
    raise _DownloadRefusedError(f"bcosvit downloads nothing (timm asked for {url})")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Inside: ``HF_HUB_OFFLINE=1`` (also for a huggingface_hub already imported, which read the
    variable then) and every URL download timm could start through torch.hub refused; restored after."""
    import torch.hub

    patches: list[tuple[object, str, object]] = [(torch.hub, "download_url_to_file", _refuse_download)]
    timm_hub = sys.modules.get("timm.models._hub")
    if timm_hub is not None and hasattr(timm_hub, "download_url_to_file"):
        patches.append((timm_hub, "download_url_to_file", _refuse_download))
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hf_constants

        patches.append((hf_constants, "HF_HUB_OFFLINE", True))
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    os.environ["HF_HUB_OFFLINE"] = "1"
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _create(timm, spec: TimmSource) -> nn.Module:
    """``timm.create_model`` of ``spec`` without weights (offline); ``ConfigError`` for arguments timm refuses."""
    try:
        with _offline():
            return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    except Exception as exc:  # timm raises TypeError, ValueError, AssertionError, RuntimeError for bad arguments
        message = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise ConfigError(f"teacher {spec.label}: {spec.call()} failed ({type(exc).__name__}: {message})") from None


@functools.lru_cache(maxsize=32)
def _skeleton_facts(canonical: str) -> tuple[int, int, int, int]:
    """``(in_chans, image_size, values in its state dict, num_classes)`` of the timm model of
    ``canonical`` (a source without weights), built on the "meta" device: no memory, no weights read."""
    timm = _import_timm()
    spec = TimmSource.parse(canonical)
    _check_timm_name(timm, spec)
    with torch.device("meta"):
        model = _create(timm, spec)
    patch = getattr(model, "patch_embed", None)
    if patch is None or getattr(patch, "proj", None) is None:
        raise ConfigError(
            f"teacher {spec.label}: timm's {spec.name} is a {type(model).__name__}, not a VisionTransformer "
            "(bcosvit converts timm's VisionTransformer)"
        )
    size = patch.img_size[0] if getattr(patch, "img_size", None) else model.pretrained_cfg["input_size"][-1]
    values = sum(t.numel() for t in model.state_dict().values())
    return int(patch.proj.in_channels), int(size), int(values), int(getattr(model, "num_classes", 0))


def _architecture(spec: TimmSource) -> str:
    """``spec`` without weights or features: what decides the timm model's shapes."""
    return str(TimmSource(spec.name, spec.kwargs))


def teacher_input(source: str) -> tuple[int, int]:
    """``(in_chans, image_size)`` of the images the timm teacher ``source`` reads (timm's, e.g.
    ``(3, 224)``), found without reading its weights."""
    in_chans, size, _, _ = _skeleton_facts(_architecture(TimmSource.parse(source)))
    return in_chans, size


def teacher_classes(source: str) -> int:
    """The classes of the timm teacher ``source``'s head (0: a headless backbone), found without
    reading its weights."""
    return _skeleton_facts(_architecture(TimmSource.parse(source)))[3]


def weights_sha256(path: str | Path, label: str = "the teacher") -> str:
    """The SHA-256 of the weights file ``path`` (a regular file; ``ConfigError`` otherwise)."""
    digest = hashlib.sha256()
    try:
        with open_regular_file(path, "weights file", "pass the weights file (.safetensors or .pt), not a folder") as f:
            while chunk := f.read(2**20):
                digest.update(chunk)
    except InputError as exc:
        raise ConfigError(f"--weights of {label}: {exc}") from None
    return digest.hexdigest()


def _read_weights_file(path: Path, spec: TimmSource, limit: int) -> bytes:
    """The bytes of the weights file ``path``: a regular file of at most ``limit`` bytes, with the
    SHA-256 the run recorded (``spec.sha256``) where it recorded one."""
    try:
        with open_regular_file(path, "weights file", "pass the weights file (.safetensors or .pt), not a folder") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise ConfigError(
                    f"teacher {spec.label}: weights file {path} is {size:,} bytes, more than {MAX_WEIGHTS_FACTOR} "
                    f"times the float32 weights of {spec.call()} ({limit:,} bytes at most): it is not this model's"
                    " weights"
                )
            data = f.read()
    except InputError as exc:
        raise ConfigError(f"teacher {spec.label}: {exc}") from None
    now = hashlib.sha256(data).hexdigest()
    if spec.sha256 is not None and now != spec.sha256:
        raise ConfigError(
            f"teacher {spec.label}: the weights file {path} has changed since it was recorded "
            f"(SHA-256 {spec.sha256[:12]}..., now {now[:12]}...); restore it, or start a new run with --weights"
        )
    return data


def _state_dict(data: bytes, path: Path, spec: TimmSource) -> dict[str, Tensor]:
    """The tensors of the weights file ``path`` (its bytes ``data``): safetensors (``.safetensors``),
    else a PyTorch file read with ``weights_only=True`` (no code runs), its ``state_dict`` or
    ``model`` entry where it is a checkpoint around one."""
    where = f"teacher {spec.label}: weights file {path}"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            state: Any = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, zip, pickle and torch raise many types for a damaged or refused file
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch (weights_only)"
        raise ConfigError(f"{where} is corrupt or no {kind} weights file ({type(exc).__name__}: {message})") from None
    for key in ("state_dict", "model"):  # a training checkpoint: {"model": state dict, "optimizer": ...}
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    tensors = isinstance(state, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    if not tensors:
        found = sorted(map(str, state))[:5] if isinstance(state, Mapping) else type(state).__name__
        raise ConfigError(f"{where} holds no state dict (parameter names to tensors); found {found}")
    return dict(state)


def _load_weights_file(model: nn.Module, spec: TimmSource) -> None:
    """Load ``spec.weights`` into the timm ``model``, every key matched (strict) and every shape
    checked first; the file must still have the SHA-256 the run recorded."""
    path = Path(str(spec.weights))
    limit = MAX_WEIGHTS_FACTOR * 4 * _skeleton_facts(_architecture(spec))[2] + _WEIGHTS_SLACK  # float32 values
    state = _state_dict(_read_weights_file(path, spec, limit), path, spec)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, path, spec.call())
    except CheckpointError as exc:
        raise ConfigError(
            f"teacher {spec.label}: {exc}; pass the weights of this model, or the timm arguments it was made with "
            "(timm:NAME?img_size=...&num_classes=...)"
        ) from None
    model.load_state_dict(state, strict=True)


def _from_cache(timm, spec: TimmSource) -> nn.Module:
    """timm's pretrained weights of ``spec`` from the user's timm / Hugging Face cache, offline."""
    _skeleton_facts(_architecture(spec))  # name and arguments fail clearly before the cache is asked
    try:
        with _offline():
            return timm.create_model(spec.name, pretrained=True, **spec.kwargs)
    except Exception as exc:  # huggingface_hub's and torch.hub's errors for a file that is not there
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
    raise ConfigError(
        f"teacher {spec.label}: timm's pretrained weights are not in the local cache ({reason}); nothing is "
        f"downloaded: pass --weights FILE (a .safetensors or PyTorch state dict of {spec.call()}), or fill the "
        f"cache where there is a network (python -c \"import timm; timm.create_model('{spec.name}', "
        'pretrained=True)") and copy it here (~/.cache/huggingface, ~/.cache/torch)'
    )


def load_timm_teacher(source: str, weights: str | Path | None = None) -> VisionTransformer:
    """The bcosvit standard twin (``from_timm``) of the timm teacher ``source`` (``TimmSource``),
    its weights from ``weights`` (or the source's ``weights=``) or, without, from the local cache
    (offline); in eval mode."""
    spec = TimmSource.parse(teacher_source(source, weights))
    timm = _import_timm()
    _check_timm_name(timm, spec)
    if spec.weights is None:
        model = _from_cache(timm, spec)
    else:
        _skeleton_facts(_architecture(spec))
        model = _create(timm, spec)
        _load_weights_file(model, spec)
    model.eval()
    try:
        twin = from_timm(model)
    except ConfigError as exc:
        raise ConfigError(f"teacher {spec.label}: {exc}") from None
    return twin.eval()


# --- teachers of a run ------------------------------------------------------------------------


def load_teacher(source: str, weights: str | Path | None = None) -> VisionTransformer:
    """The model ``source`` names: a run folder or ``.safetensors`` file, a registered name with
    shipped weights (``bcosvit.weights.load_weights``), or a timm model ``timm:NAME``
    (``load_timm_teacher``; ``weights``: its weights file); in eval mode."""
    if is_timm_source(source) or weights is not None:
        return load_timm_teacher(source, weights)
    try:
        return load_weights(source)
    except ConfigError as exc:
        raise ConfigError(f"teacher: {exc}") from None


def bcos_twin_name(source: str) -> str:
    """The B-cos name of the teacher ``source``'s family (``vitc_micro_28`` -> ``bcos_vitc_micro_28``):
    the ``model`` a run B-cosifying or aligning to it records. A timm teacher ``timm:NAME`` has
    no registered twin: its runs record ``bcos_timm:NAME``, the architecture the converted teacher's."""
    if is_timm_source(source):
        return TEACHER_FAMILY_PREFIX + TimmSource.parse(source).name
    name = source
    if Path(source).exists():
        name = str(weights_metadata(source).get("model_name", ""))
    twin = name if name.startswith(BCOS_PREFIX) else twin_name(name)
    if twin not in list_models():
        raise ConfigError(
            f"teacher {source!r} (model {name!r}) has no registered B-cos twin; name the model with --model"
        )
    return twin


def bcosified_teacher(source: str, num_classes: int, b: float = 1.0) -> VisionTransformer:
    """``bcosify`` of the teacher ``source`` at exponent ``b``, with its biases: the start of a
    B-cosification run (``b = 1``: the teacher's logits exactly). ``num_classes``: the dataset's.
    A teacher used for its features alone (``teacher_features``) gets a fresh head of
    ``num_classes`` first where its own has another number of classes (or it has none)."""
    teacher = load_teacher(source)
    if teacher.num_classes != num_classes:
        name = TimmSource.parse(source).label if is_timm_source(source) else repr(source)
        if teacher_features(source):
            teacher.reset_classifier(num_classes)  # alignment ignores it; the linear probe trains it
        elif teacher.num_classes == 0:
            raise ConfigError(
                f"teacher {name} is a headless backbone (no classifier head): B-cosifying it needs its logits. "
                "Align a B-cos student to its features instead: bcosvit align --teacher ... --teacher-features"
            )
        else:
            raise ConfigError(
                f"teacher {name} has {teacher.num_classes} classes but the dataset {num_classes}; "
                "B-cosify a teacher trained on this dataset, or align to its features (bcosvit align "
                "--teacher-features)"
            )
    model = bcosify(teacher).train()
    set_b(model, b)
    return model


def bcos_student(source: str, num_classes: int) -> VisionTransformer:
    """The teacher ``source`` B-cosified as the published students start: B = 2, every bias dropped
    (``remove_biases``), unnormalised weights, detachable GELU (Arya et al.'s released ViT configs;
    ALOE's student initialisation)."""
    return remove_biases(bcosified_teacher(source, num_classes, b=2.0))


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode without gradients (a teacher)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
