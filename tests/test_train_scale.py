"""The training loop at scale: steps that never wait for the device, clipping in grouped kernels,
gradient checkpointing, validation every ``eval_every`` epochs on shards of the test set, the
non-finite-loss check at the log reads, compile after a B-cosification warmup, and a bounded
end-of-training figure."""

from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import bcosvit.app.data
from bcosvit import create_model
from bcosvit.app.data import dataset_labels, load_dataset
from bcosvit.app.loading import ShardSampler
from bcosvit.app.training import clipping, loop, train
from bcosvit.app.training.clipping import adaptive_clip_grad_
from bcosvit.app.training.distributed import Runtime
from bcosvit.app.training.loop import TrainingRun, resolve_config
from bcosvit.app.training.runner import FIGURE_CLASSES, run_training, write_explanation_figure
from bcosvit.app.training.step import update_ema
from bcosvit.weights.checkpoint import save_weights
from tests.test_align import standard_teacher
from tests.test_bcosify_training import bcosify_config
from tests.test_train import tiny_config

CPU = Runtime(0, 1, torch.device("cpu"))


def unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    """The reference: the norm of each output row of a weight, the whole norm of a vector."""
    if t.ndim <= 1:
        return t.norm()
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


@torch.no_grad()
def clip_each_parameter_(parameters, clip: float = 0.01, eps: float = 1e-3) -> None:
    """The reference: adaptive clipping one parameter at a time (what clipping.py did before)."""
    for p in parameters:
        if p.grad is not None:
            scale = (unitwise_norm(p).clamp_min(eps) * clip / unitwise_norm(p.grad).clamp_min(1e-6)).clamp(max=1.0)
            p.grad.mul_(scale)


def model_with_gradients(name: str) -> torch.nn.Module:
    """``name`` after one backward pass of a random batch (the same each time), its first
    parameter without a gradient."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    model(torch.rand(4, 1, 28, 28)).logsumexp(1).sum().mul(100).backward()
    next(model.parameters()).grad = None
    return model


@pytest.mark.parametrize("name", ["bcos_vit_nano_patch4_28", "vit_nano_patch4_28"])
@pytest.mark.parametrize("stack_elements", [clipping.STACK_ELEMENTS, 300], ids=["whole groups", "chunked"])
def test_grouped_adaptive_clipping_equals_clipping_each_parameter(name, stack_elements, monkeypatch):
    monkeypatch.setattr(clipping, "STACK_ELEMENTS", stack_elements)
    model, reference = model_with_gradients(name), model_with_gradients(name)
    params, reference_params = list(model.parameters()), list(reference.parameters())
    assert len({p.shape for p in params}) > 3 and any(p.grad is None for p in params)
    adaptive_clip_grad_(params, 0.01, 1e-3)
    clip_each_parameter_(reference_params, 0.01, 1e-3)
    clipped = 0
    for p, ref, before in zip(params, reference_params, model_with_gradients(name).parameters(), strict=True):
        if ref.grad is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=1e-12)
        clipped += not torch.equal(ref.grad, before.grad)
    assert clipped > 0  # the bound was reached somewhere: the comparison covers the scaling


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


class DeviceReads:
    """Records every read of a tensor's values by the host (``HOST_READS``: on a GPU, each waits for
    the device to finish) while ``counting``, except reads of tensors known to live on the host:
    draws of torch's CPU generator (``torch.rand`` / ``torch.randint`` without a device) and those
    given to ``add_host``. Python-level reads only: a CPU kernel's own checks (``F.one_hot``'s) are not
    made on a GPU and are not seen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[str] = []
        self._host: dict[int, weakref.ref] = {}  # by id: a WeakSet would compare tensors with ==
        self.counting = False
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))
        for name in ("rand", "randint"):
            monkeypatch.setattr(torch, name, self._host_draw(getattr(torch, name)))

    def _recording(self, name, read):
        def recorded(tensor, *args, **kwargs):
            if self.counting and not self.on_host(tensor):
                self.reads.append(f"{name} of {tuple(tensor.shape)} {tensor.dtype}")
            return read(tensor, *args, **kwargs)

        return recorded

    def _host_draw(self, draw):
        def drawn(*args, **kwargs):
            result = draw(*args, **kwargs)
            if kwargs.get("device") is None:
                self.add_host(result)
            return result

        return drawn

    def add_host(self, tensor: torch.Tensor) -> None:
        self._host[id(tensor)] = weakref.ref(tensor)

    def on_host(self, tensor: torch.Tensor) -> bool:
        known = self._host.get(id(tensor))
        return known is not None and known() is tensor

    def paused(self, function):
        """``function`` with nothing counted while it runs."""

        def run(*args, **kwargs):
            counting, self.counting = self.counting, False
            try:
                return function(*args, **kwargs)
            finally:
                self.counting = counting

        return run


def built_run(tmp_path: Path, **overrides) -> TrainingRun:
    """A run of ``tiny_config(**overrides)`` built on the CPU, as ``train`` builds it."""
    config, _ = resolve_config(tiny_config(**overrides), CPU.device)
    return TrainingRun.build(config, tmp_path, CPU)


STEP_SETTINGS = {
    "B-cos: Adam, adaptive clipping, BCE": {},
    "standard: AdamW, grad-norm clipping, label smoothing, EMA": dict(
        model="vit_nano_patch4_28", label_smoothing=0.1, ema=0.9
    ),
    "mosaics with the energy loss, EMA": dict(mosaic=1.0, energy_loss=1.0, ema=0.9),
    "energy canvases": dict(energy_loss=1.0, energy_canvases=2),
}


STEP_SETTINGS["alignment to a teacher"] = "align"


@pytest.mark.parametrize("overrides", STEP_SETTINGS.values(), ids=STEP_SETTINGS.keys())
def test_a_training_step_never_reads_a_device_tensor_on_the_host(tmp_path, monkeypatch, overrides):
    if overrides == "align":
        teacher = str(standard_teacher(tmp_path / "teacher"))
        overrides = dict(bcosify_from=teacher, bcosify_warmup_epochs=0.0, align_to=teacher, batch_size=32)
    run = built_run(tmp_path, **overrides)
    trainer = run.trainer
    reads = DeviceReads(monkeypatch)
    # torch's (non-capturable) optimizers keep their step counts on the host and read them there;
    # the EMA's average count lives on the host too
    trainer.optimizer.step = reads.paused(trainer.optimizer.step)
    if trainer.ema is not None:
        reads.add_host(trainer.ema.n_averaged)
    batches = iter(run.data.train_loader)
    for step in range(3):
        images, labels = next(batches)
        reads.counting = True
        sums = trainer.step(images, labels, step)
        reads.counting = False
        assert reads.reads == [], f"step {step}"
        assert 0 < sums.count <= len(labels) and sums.loss.ndim == sums.hits.ndim == 0  # mosaics: canvases


@pytest.mark.parametrize("overrides", [{}, dict(model="vit_nano_patch4_28", ema=0.9)], ids=["B-cos", "standard"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_recomputing_each_block(tmp_path, overrides):
    plain, checkpointed = (built_run(tmp_path / f"{on}", grad_checkpointing=on, **overrides) for on in (False, True))
    forwards = []  # block calls (pre-hooks: a recomputation stops once it has what the backward needs)
    for block in checkpointed.trainer.model.blocks:
        block.register_forward_pre_hook(lambda module, args: forwards.append(module))
    images, labels = next(iter(plain.data.train_loader))
    sums = [run.trainer.step(images, labels, 0) for run in (plain, checkpointed)]
    torch.testing.assert_close(sums[0].loss, sums[1].loss, rtol=0, atol=0)
    depth = len(checkpointed.trainer.model.blocks)
    assert len(forwards) == 2 * depth  # each block ran again in the backward pass
    named = dict(checkpointed.trainer.model.named_parameters())
    for name, p in plain.trainer.model.named_parameters():
        torch.testing.assert_close(named[name].grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)


def test_the_ema_update_is_torchs_without_its_device_copy():
    model = create_model("bcos_vit_nano_patch4_28")
    ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    torchs = copy.deepcopy(ours)
    for _ in range(3):  # the first update copies, the next ones average
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        update_ema(ours, model)
        torchs.update_parameters(model)
    assert int(ours.n_averaged) == int(torchs.n_averaged) == 3
    for (name, a), b in zip(ours.state_dict().items(), torchs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 5, 64, 63])
def test_the_test_set_shards_hold_every_item_exactly_once(size, world_size):
    shards = [list(ShardSampler(size, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(ShardSampler(size, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shards]


def test_epochs_between_validations_record_no_test_metrics_and_say_so(tmp_path, capsys):
    metrics = train(tiny_config(epochs=3, eval_every=2), tmp_path, progress=False)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["test_top1" in h for h in history] == [False, True, True]  # every 2nd epoch and the last
    assert metrics["epoch"] == 3 and "test_top1" in metrics
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert "not validated (every 2 epochs and after the last)" in lines[0] and "test top-1" in lines[1]
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_run_stopped_before_a_validation_says_its_last_epoch_was_not_validated(tmp_path, capsys):
    metrics = run_training(tiny_config(epochs=2, eval_every=2), tmp_path, progress=False, stop_after=1)
    assert metrics["epoch"] == 1 and "test_top1" not in metrics
    assert "Not validated after epoch 1/2 (eval_every 2; the last epoch always is)." in capsys.readouterr().out


class NaNImages(torch.utils.data.Dataset):
    """``dataset`` with every image replaced by NaNs (float): a loss that cannot stay finite."""

    def __init__(self, dataset) -> None:
        self.dataset, self.targets = dataset, dataset_labels(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return torch.full(image.shape, float("nan")), label


def nan_training_images(name, split, *args, **kwargs):
    """``load_dataset`` with NaN training images."""
    dataset, spec = load_dataset(name, split, *args, **kwargs)
    return (NaNImages(dataset) if split == "train" else dataset), spec


def test_a_non_finite_loss_stops_the_epoch_at_a_log_read_before_it_is_saved(tmp_path):
    config = tiny_config(epochs=2, log_every=2)  # 4 steps an epoch: read after 2 and at the end
    train(config, tmp_path, progress=False, stop_after=1)
    saved = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(FloatingPointError, match=r"nan in steps 1-2 of epoch 2; lower lr or enable clipping"):
        train(config, tmp_path, progress=False, resume=True, dataset_loader=nan_training_images)
    assert json.loads((tmp_path / "model.json").read_text())["epoch"] == 1
    assert (tmp_path / "model.safetensors").read_bytes() == saved
    assert train(config, tmp_path, progress=False, resume=True)["epoch"] == 2  # --resume, as the error says


def test_compile_waits_for_the_end_of_the_bcosification_warmup(tmp_path, monkeypatch, capsys):
    compiled = []  # the value of B when each model was compiled
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(net.config.b) or net)
    teacher = standard_teacher(tmp_path / "teacher")
    config = bcosify_config(teacher, bcosify_warmup_epochs=1.0, epochs=2, compile=True, precision="fp32")
    train(config, tmp_path / "run", progress=False)  # a 4-step warmup
    out = capsys.readouterr().out
    assert "eager through the B-cosification warmup, torch.compile from step 5" in out
    assert "torch.compile on from step 5: the B-cosification warmup is over" in out
    assert compiled == [2.0]  # the training step, once B stays 2; a few test images validate eagerly
    assert "validation eager" in out


@pytest.mark.parametrize("threshold", [None, 1])
def test_validation_is_compiled_only_where_the_run_validates_enough_images_to_pay_for_it(
    tmp_path, monkeypatch, capsys, threshold
):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(type(net).__name__) or net)
    if threshold is not None:
        monkeypatch.setattr(loop, "COMPILE_VALIDATION_MIN_IMAGES", threshold)
    config = tiny_config(epochs=2, compile=True, precision="fp32")
    train(config, tmp_path, progress=False)
    out = capsys.readouterr().out
    validated = 2 * config.test_subset  # two epochs, each validated
    if threshold is None:  # the tiny run validates far fewer images than compiling costs
        assert compiled == ["VisionTransformer"]
        assert f"validation eager ({validated} images in all: compiling it pays from 50000)" in out
    else:
        assert compiled == ["VisionTransformer", "VisionTransformer"]  # training, then validation once
        assert "validation eager" not in out


def folder_of_classes(root: Path, count: int, per_class: int = 2) -> Path:
    """``root/val/c00 ... c<count-1>``, each with ``per_class`` small PNGs."""
    for k in range(count):
        folder = root / "val" / f"c{k:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10, 12), (10 * k, 40 * i, 90)).save(folder / f"{i}.png")
    return root


def test_the_figure_explains_one_image_of_at_most_16_classes_decoding_only_those(tmp_path, monkeypatch, capsys):
    data = folder_of_classes(tmp_path / "data", 20)
    decoded = []
    read = bcosvit.app.data.read_folder_image
    monkeypatch.setattr(bcosvit.app.data, "read_folder_image", lambda path: decoded.append(path) or read(path))
    model = create_model("bcos_vit_nano_patch4_28", in_chans=3, num_classes=20, image_size=8, depth=1)
    save_weights(model, tmp_path / "run" / "model.safetensors", {"model_name": "bcos_vit_nano_patch4_28"})
    figure = write_explanation_figure(tmp_path / "run", tiny_config(dataset="folder", data_dir=str(data), image_size=8))
    assert figure.is_file()
    assert f"explained {FIGURE_CLASSES} test images" in capsys.readouterr().out
    assert len(decoded) == FIGURE_CLASSES and len({Path(p).parent.name for p in decoded}) == FIGURE_CLASSES
    assert {Path(p).name for p in decoded} == {"0.png"}  # each class's first image
