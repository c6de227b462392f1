"""Numeric precision chosen by the hardware: bfloat16 autocast where it is native, float32 elsewhere.

bf16 autocast pays off only where the hardware computes in bfloat16: CUDA devices with bf16 support,
and CPUs with AVX512-BF16 or AMX. Elsewhere (e.g. a CPU with AVX2 only) every bf16 matrix product is
emulated, so a training step runs far slower under bf16 autocast than in float32 (measured with
``benchmarks/precision.py``, docs/results.md, "Precision"): ``"auto"`` picks float32 there.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_features() -> dict[str, bool]:
    """The CPU's vector and matrix extensions as PyTorch sees them (all False where torch cannot tell)."""
    probes = {
        "avx2": "_is_avx2_supported",
        "avx512": "_is_avx512_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx": "_is_amx_tile_supported",
    }
    features = {}
    for name, probe in probes.items():
        check = getattr(torch.cpu, probe, None)
        features[name] = bool(check()) if check is not None else False
    return features


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 arithmetic runs in hardware on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        features = cpu_features()
        return features["avx512_bf16"] or features["amx"]
    return False


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses (``"fp32"`` or ``"bf16"``) and why."""

    precision: str
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    flags = [name for name, present in cpu_features().items() if present]
    return f"CPU with {', '.join(flags) or 'no AVX2/AVX512'}"


def resolve_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """``"auto"`` -> bf16 where native on ``device``, else fp32; ``"fp32"``/``"bf16"`` are kept as given."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    native = native_bf16(device)
    hardware = _hardware(device)
    if requested == "auto":
        if native:
            return PrecisionChoice("bf16", f"auto: native bfloat16 on {hardware}")
        return PrecisionChoice("fp32", f"auto: no native bfloat16 on {hardware}")
    if requested == "bf16" and not native:
        return PrecisionChoice("bf16", f"as requested, but {hardware} has no native bfloat16: expect a slow run")
    return PrecisionChoice(requested, "as requested")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``"bf16"``; nothing for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether ``torch.compile`` can generate code for ``device``, and if not, why.

    On a CPU, TorchInductor compiles C++ and needs a compiler on the PATH.
    """
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return False, "no C++ compiler on the PATH (install g++ to enable torch.compile on the CPU)"
    return True, ""
