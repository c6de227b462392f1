"""Numeric precision chosen by the hardware: bfloat16 autocast where it is native and measured
faster, float32 elsewhere.

bf16 autocast pays off only where the hardware computes in bfloat16: CUDA devices with bf16 support,
and CPUs with AVX512-BF16 or AMX. Elsewhere (e.g. a CPU with AVX2 only) every bf16 matrix product is
emulated, so a training step runs far slower under bf16 autocast than in float32 (measured with
``benchmarks/precision.py``, docs/results.md, "Precision"): ``"auto"`` picks float32 there. On a CPU
that has the flags, ``"auto"`` also times a training step's matrix products once per process in
both precisions (``cpu_bf16_speedup``, a fraction of a second) and keeps bf16 only where they run
``MIN_BF16_SPEEDUP`` times faster: a flag says the instructions exist, not that they are fast
(a virtual machine may expose them without the throughput).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


# bf16 must beat float32 by this factor on a CPU's step-shaped products. Measured ratios: 4.0-4.3x on
# AVX512-BF16 without AMX, where the B-cos train step is then 2.1-3.0x faster (docs/results.md,
# "Performance"); emulated bf16 (AVX2 only) is about 0.1x.
MIN_BF16_SPEEDUP = 1.3
SPEEDUP_SHAPE = (2048, 384, 1536)  # rows, in, out: a ViT-S MLP layer on 2048 tokens


@functools.cache
def cpu_bf16_speedup(repeats: int = 5) -> float:
    """How many times faster a linear layer's forward + input/weight gradients run under bf16 autocast
    than in float32 on this CPU (median of ``repeats`` after a warm-up; once per process)."""
    rows, fan_in, fan_out = SPEEDUP_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, fan_in, generator=generator)
    weight = torch.randn(fan_out, fan_in, generator=generator)
    grad = torch.randn(rows, fan_out, generator=generator)

    def step(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = torch.nn.functional.linear(x, weight)
            grad_out = grad.to(out.dtype)
            grad_out @ weight.to(out.dtype), grad_out.T @ x.to(out.dtype)
        return time.perf_counter() - start

    with torch.no_grad():
        for dtype in (None, torch.bfloat16):
            step(dtype)
        fp32 = statistics.median(step(None) for _ in range(repeats))
        bf16 = statistics.median(step(torch.bfloat16) for _ in range(repeats))
    return fp32 / max(bf16, 1e-9)


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
        if not native:
            return PrecisionChoice("fp32", f"auto: no native bfloat16 on {hardware}")
        if device.type != "cpu":
            return PrecisionChoice("bf16", f"auto: native bfloat16 on {hardware}")
        speedup = cpu_bf16_speedup()
        measured = f"step-shaped bf16 products {speedup:.1f}x float32"
        if speedup < MIN_BF16_SPEEDUP:
            return PrecisionChoice(
                "fp32", f"auto: {hardware} has bfloat16 instructions, but {measured} (bf16 needs {MIN_BF16_SPEEDUP}x)"
            )
        return PrecisionChoice("bf16", f"auto: native bfloat16 on {hardware}, {measured}")
    if requested == "bf16" and not native:
        return PrecisionChoice("bf16", f"as requested, but {hardware} has no native bfloat16: expect a slow run")
    return PrecisionChoice(requested, "as requested")


def agree_on_precision(choice: PrecisionChoice, device: torch.device) -> PrecisionChoice:
    """Process 0's ``choice`` in every process of a ``torch.distributed`` CPU job (each process
    measures ``cpu_bf16_speedup`` itself, and a job must not train in two precisions); ``choice``
    unchanged outside one. Every process of the job must call it."""
    if device.type != "cpu" or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choice
    flag = torch.tensor([choice.precision == "bf16"], dtype=torch.int32)
    dist.broadcast(flag, src=0)
    precision = "bf16" if bool(flag.item()) else "fp32"
    if precision == choice.precision:
        return choice
    return PrecisionChoice(precision, f"{choice.reason}; process 0 chose {precision}")


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
