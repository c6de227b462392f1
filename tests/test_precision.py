"""Precision chosen by the hardware: bf16 autocast only where bfloat16 is native."""

import json

import pytest
import torch

from bcosvit import VisionTransformer
from bcosvit.app import precision
from bcosvit.app.precision import resolve_precision
from bcosvit.app.training import TrainConfig, list_recipes, load_recipe, train

from .test_train import needs_torchrun, tiny_config, torchrun_two

CPU = torch.device("cpu")


def one_short_epoch(**overrides) -> TrainConfig:
    return tiny_config(train_subset=64, test_subset=32, epochs=1, batch_size=32, warmup_steps=1, **overrides)


@pytest.fixture
def avx2_only(monkeypatch):
    """A CPU like the project's check machines: AVX2, no AVX512-BF16, no AMX."""
    monkeypatch.setattr(
        precision, "cpu_features", lambda: {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False}
    )


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with AVX512-BF16 whose bf16 products run 4x faster than float32 (this project's AVX512-BF16 kind)."""
    monkeypatch.setattr(
        precision, "cpu_features", lambda: {"avx2": True, "avx512": True, "avx512_bf16": True, "amx": False}
    )
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 4.0)


def test_auto_picks_fp32_on_a_cpu_without_native_bf16(avx2_only):
    choice = resolve_precision("auto", CPU)
    assert choice.precision == "fp32"
    assert "no native bfloat16" in choice.reason and "avx2" in choice.reason


def test_auto_picks_bf16_on_a_cpu_with_avx512_bf16(bf16_cpu):
    choice = resolve_precision("auto", CPU)
    assert choice.precision == "bf16" and "bf16 products 4.0x float32" in choice.reason


def test_auto_keeps_fp32_where_the_bf16_flag_is_there_but_its_products_are_not_faster(bf16_cpu, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 1.1)
    choice = resolve_precision("auto", CPU)
    assert choice.precision == "fp32"
    assert "has bfloat16 instructions, but step-shaped bf16 products 1.1x float32" in choice.reason


def test_auto_measures_nothing_where_the_cpu_has_no_bf16_flag(avx2_only, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("measured on an AVX2-only CPU"))
    assert resolve_precision("auto", CPU).precision == "fp32"


def test_the_bf16_speedup_is_measured_on_this_cpu_and_agrees_with_its_flags():
    speedup = precision.cpu_bf16_speedup.__wrapped__(repeats=3)  # a fresh measurement, not the cached one
    assert 0 < speedup < 100
    if not precision.native_bf16(CPU):  # emulated bf16 is several times slower than float32
        assert speedup < 1.0


def test_explicit_precisions_are_kept_and_slow_bf16_is_flagged(avx2_only):
    assert resolve_precision("fp32", CPU).precision == "fp32"
    choice = resolve_precision("bf16", CPU)
    assert choice.precision == "bf16" and "expect a slow run" in choice.reason


def test_every_recipe_trains_in_fp32_on_a_cpu_without_native_bf16(avx2_only):
    stages = {(name, stage.name): stage.config for name in list_recipes() for stage in load_recipe(name).stages}
    chosen = {where: resolve_precision(config.precision, CPU).precision for where, config in stages.items()}
    assert set(chosen.values()) == {"fp32"}, {n: p for n, p in chosen.items() if p != "fp32"}


def precision_of_forward(module, args, output, used: list[str]) -> None:
    """A forward hook: the precision the forward pass of a ``VisionTransformer`` ran in, into ``used``."""
    if isinstance(module, VisionTransformer):
        device = args[0].device.type
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        used.append("bf16" if bf16 else "fp32")


def test_training_prints_and_records_the_chosen_precision(avx2_only, tmp_path, capsys):
    used = []  # the precision of every forward pass of the model: training steps and evaluation
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: precision_of_forward(module, args, output, used)
    )
    config = one_short_epoch()
    assert config.precision == "auto"
    try:
        train(config, tmp_path, progress=False)
    finally:
        hook.remove()
    assert "precision fp32 (auto: no native bfloat16" in capsys.readouterr().out
    assert json.loads((tmp_path / "model.json").read_text())["precision"] == "fp32"
    assert used and set(used) == {"fp32"}


def test_compile_is_skipped_with_a_message_where_no_compiler_exists(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(precision.shutil, "which", lambda name: None)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(net) or net)
    config = one_short_epoch(compile=True, precision="fp32")
    train(config, tmp_path, progress=False)
    assert "torch.compile skipped: no C++ compiler" in capsys.readouterr().out
    assert not compiled


AGREE_SCRIPT = """
import torch, torch.distributed as dist
from bcosvit.app.precision import PrecisionChoice, agree_on_precision
dist.init_process_group("gloo")
rank = dist.get_rank()
mine = PrecisionChoice("bf16" if rank == 0 else "fp32", f"measured by {rank}")
agreed = agree_on_precision(mine, torch.device("cpu"))
print(f"rank {rank}: {agreed}")
dist.destroy_process_group()
"""


@pytest.mark.ddp
@needs_torchrun
def test_the_processes_of_a_cpu_job_train_in_process_zeros_precision(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    done = torchrun_two(str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: bf16 (measured by 0)" in done.stdout
    assert "rank 1: bf16 (measured by 1; process 0 chose bf16)" in done.stdout
