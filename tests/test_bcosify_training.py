"""B-cosification runs (Arya et al., NeurIPS 2024): the schedule (B 1 -> 2, biases -> 0), the saved
bias-free model, exact resume mid-warmup, and ``bcosvit train --bcosify-from`` with the shipped twin."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bcosvit import ConfigError, bcosify, create_model, explain, load_model
from bcosvit.app.cli import main
from bcosvit.app.training import train
from bcosvit.app.training.builders import build_model
from bcosvit.app.training.schedules import BcosifySchedule, bcosify_progress, bias_step_ratio
from bcosvit.bcosification import is_norm
from tests.test_align import standard_teacher
from tests.test_train import SUBSET, straight_and_resumed, tiny_config


def bcosify_config(teacher, **overrides):
    """Steps of 16 images over 64 (4 per epoch), B-cosifying ``teacher`` with a one-epoch warmup."""
    base = dict(model="bcos_vit_nano_patch4_28", bcosify_from=str(teacher), bcosify_warmup_epochs=1.0)
    base |= dict(train_subset=64, test_subset=32, batch_size=16, epochs=2, lr=1e-4)
    return tiny_config(**{**base, **overrides})


def test_schedule_raises_b_linearly_and_takes_the_biases_to_exactly_zero():
    assert [bcosify_progress(t, 4) for t in (0, 1, 2, 4, 9)] == [
        (1.0, 1.0),
        (1.25, 0.75),
        (1.5, 0.5),
        (2.0, 0.0),
        (2.0, 0.0),
    ]
    assert bcosify_progress(0, 0) == (2.0, 0.0)  # the authors' released choice
    scale = 1.0
    for t in range(6):  # the per-step ratios multiply up to the schedule, then hold 0
        scale *= bias_step_ratio(t, 6)
        assert math.isclose(scale, bcosify_progress(t + 1, 6)[1], abs_tol=1e-12)
    assert scale == 0.0 and bias_step_ratio(6, 6) == 0.0 and bias_step_ratio(20, 6) == 0.0


def test_the_bias_schedules_default_to_bs_and_may_run_longer_for_the_norms():
    config = lambda **kw: type("C", (), {"bcosify_from": "t", "bcosify_warmup_epochs": 0.5, **kw})  # noqa: E731
    unset = dict(bcosify_bias_epochs=None, bcosify_norm_bias_epochs=None)
    assert BcosifySchedule.from_config(config(**unset), 4) == BcosifySchedule(2, 2, 2)  # one schedule, as before
    assert BcosifySchedule.from_config(config(**{**unset, "bcosify_bias_epochs": 1.0}), 4) == BcosifySchedule(2, 4, 4)
    longer = BcosifySchedule.from_config(config(bcosify_bias_epochs=1.0, bcosify_norm_bias_epochs=1.5), 4)
    assert longer == BcosifySchedule(2, 4, 6) and longer.steps == 6
    assert BcosifySchedule.from_config(config(bcosify_warmup_epochs=0.0, **unset), 4) is None
    assert [longer.b(t) for t in (0, 1, 2, 5)] == [1.0, 1.5, 2.0, 2.0]
    assert [longer.bias_scales(t) for t in (0, 2, 4, 6)] == [(1.0, 1.0), (0.5, 1 - 2 / 6), (0.0, 1 - 4 / 6), (0.0, 0.0)]
    assert [longer.biases_gone(t) for t in (4, 5, 6)] == [False, False, True]
    other = norm = 1.0
    for t in range(8):  # the per-step ratios multiply up to each schedule, then hold 0
        ratios = longer.bias_ratios(t)
        other, norm = other * ratios[0], norm * ratios[1]
        assert all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip((other, norm), longer.bias_scales(t + 1)))


def test_the_norms_keep_their_biases_after_the_others_are_gone(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    config = bcosify_config(
        teacher, bcosify_warmup_epochs=0.5, bcosify_bias_epochs=1.0, bcosify_norm_bias_epochs=1.5, epochs=2, ema=0.9
    )
    train(config, tmp_path / "run", progress=False, stop_after=1)  # 4 steps: B = 2, other biases 0, norms' 1/3
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["bcosify"]["b"] == 2.0 and state["bcosify"]["bias_scale"] == 0.0
    assert math.isclose(state["bcosify"]["norm_bias_scale"], 1 - 4 / 6)
    model = build_model(config, type("Spec", (), {"num_classes": 10}))
    norms = {f"{name}.bias" for name, module in model.named_modules() if is_norm(module) and module.bias is not None}
    assert norms and set(_biases(state["model"])) - norms  # both kinds are there
    for name, value in _biases(state["model"]).items():
        assert (value.abs().sum() > 0) == (name in norms), name
    ema = {k[len("module.") :]: v for k, v in state["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(ema[k], v) for k, v in state["model"].items())  # still following: a norm bias changes
    assert load_model(tmp_path / "run").config.bias

    train(config, tmp_path / "run", progress=False, resume=True)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["bcosify"]["norm_bias_scale"] == 0.0
    assert all(torch.equal(v, torch.zeros_like(v)) for v in _biases(state["model"]).values())
    final = load_model(tmp_path / "run")
    assert not final.config.bias and final.config.b == 2.0


def test_bias_schedules_without_a_warmup_or_of_zero_epochs_are_refused(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="bcosify_norm_bias_epochs must be > 0"):
        bcosify_config(teacher, bcosify_norm_bias_epochs=0.0).validate()
    with pytest.raises(ConfigError, match="bcosify_bias_epochs schedules the biases"):
        bcosify_config(teacher, bcosify_warmup_epochs=0.0, bcosify_bias_epochs=2.0).validate()
    with pytest.raises(ConfigError, match="needs bcosify_from"):
        tiny_config(model="bcos_vit_nano_patch4_28", bcosify_bias_epochs=2.0).validate()


def _biases(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(".bias")}


def test_a_run_starts_as_the_teacher_and_ends_the_warmup_bias_free_with_b_2_and_complete(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    config = bcosify_config(teacher, bcosify_warmup_epochs=1.5, epochs=2)
    spec = type("Spec", (), {"num_classes": 10})
    start, images = build_model(config, spec).eval(), torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(start(images), load_model(teacher)(images), atol=1e-5, rtol=1e-5)
    assert start.config.bias and start.config.b == 1.0

    train(config, tmp_path / "run", progress=False, stop_after=1)  # 4 of 6 warmup steps
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    third = 1 - 4 / 6
    assert state["bcosify"] == {
        "warmup_steps": 6, "bias_steps": 6, "norm_bias_steps": 6, "b": 1 + 4 / 6, "bias_scale": third,
        "norm_bias_scale": third,
    }  # fmt: skip
    mid = load_model(tmp_path / "run")
    assert mid.config.bias and math.isclose(mid.config.b, 1 + 4 / 6)
    assert any(v.abs().sum() > 0 for v in _biases(load_file(str(tmp_path / "run" / "model.safetensors"))).values())

    train(config, tmp_path / "run", progress=False, resume=True)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["bcosify"]["b"] == 2.0 and state["bcosify"]["bias_scale"] == 0.0
    assert all(torch.equal(v, torch.zeros_like(v)) for v in _biases(state["model"]).values())  # exactly 0
    model = load_model(tmp_path / "run").double()
    assert not model.config.bias and model.config.b == 2.0 and not _biases(model.state_dict())
    expl = explain(model, torch.rand(4, 1, 28, 28, dtype=torch.float64))
    assert float(expl.completeness_error.abs().max()) < 1e-8


def test_a_run_interrupted_mid_warmup_resumes_to_the_uninterrupted_weights(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    config = bcosify_config(teacher, bcosify_warmup_epochs=1.5, epochs=3, ema=0.9)
    a, b = straight_and_resumed(config, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not _biases(a)  # the EMA's biases went to 0 with the model's


def test_the_ema_follows_the_model_during_the_warmup_and_averages_after_it(tmp_path):
    """Weights from different B and bias scales are different functions: averaging starts after the warmup."""
    teacher = standard_teacher(tmp_path / "teacher")
    config = bcosify_config(teacher, bcosify_warmup_epochs=1.0, epochs=2, ema=0.9)
    train(config, tmp_path / "run", progress=False, stop_after=1)  # the whole warmup (4 steps)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    ema = {k[len("module.") :]: v for k, v in state["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(ema[k], v) for k, v in state["model"].items())
    train(config, tmp_path / "run", progress=False, resume=True)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    ema = {k[len("module.") :]: v for k, v in state["ema"].items() if k.startswith("module.")}
    assert any(not torch.equal(ema[k], v) for k, v in state["model"].items() if v.is_floating_point())


def test_without_warmup_the_model_is_bias_free_with_b_2_from_the_first_step(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    spec = type("Spec", (), {"num_classes": 10})
    model = build_model(bcosify_config(teacher, bcosify_warmup_epochs=0.0), spec)
    assert not model.config.bias and model.config.b == 2.0 and not _biases(model.state_dict())


def test_bcosify_settings_that_cannot_work_are_refused(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="model_options empty"):
        bcosify_config(teacher, model_options={"depth": 2}).validate()
    with pytest.raises(ConfigError, match="B-cos family"):
        bcosify_config(teacher, model="vit_nano_patch4_28").validate()
    with pytest.raises(ConfigError, match="already a B-cos model"):
        bcosify(create_model("bcos_vit_nano_patch4_28"))
    with pytest.raises(ConfigError, match="12 classes but the dataset 10"):
        twelve = standard_teacher(tmp_path / "t12", num_classes=12)
        build_model(bcosify_config(twelve), type("Spec", (), {"num_classes": 10}))


def test_bcosify_from_the_shipped_twin_trains_an_epoch_into_a_run_folder_that_explains(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--bcosify-from", "vitc_micro_28", "--out", str(out), "--data-dir", SUBSET, "--epochs", "1"]
    args += ["--batch-size", "16", "--lr", "1e-4", "--no-progress"]
    args += ["--set", "train_subset=32", "--set", "test_subset=16", "--set", "explain_examples=false"]
    assert main(args) == 0
    assert "B-cosified from vitc_micro_28" in capsys.readouterr().out
    meta = json.loads((out / "model.json").read_text())
    assert meta["model_name"] == "bcos_vitc_micro_28" and meta["metrics"]["teacher_forwards"] == 0
    model = load_model(out).double()
    assert model.is_bcos and not model.config.bias and model.config.b == 2.0
    assert model.config.pos_embed == "rope"  # the teacher's architecture
    expl = explain(model, torch.rand(2, 1, 28, 28, dtype=torch.float64))
    assert float(expl.completeness_error.abs().max()) < 1e-8
