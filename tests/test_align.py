"""Alignment to a frozen teacher without labels (ALOE, Maser et al., CVPR 2026): the loss, label
independence, exact resume, a teacher of another shape, and ``bcosvit align``'s two stages."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from bcosvit import ConfigError, create_model, explain, load_model
from bcosvit.app.cli import main
from bcosvit.app.data import batch_to_device, dataset_labels, load_dataset
from bcosvit.app.training import train
from bcosvit.app.training.align import AlignmentNet, aligned_depths
from bcosvit.app.training.teacher import bcos_student, load_teacher
from bcosvit.weights.checkpoint import save_weights
from tests.test_train import SUBSET, needs_torchrun, straight_and_resumed, tiny_config, torchrun_two

FASHION = dict(in_chans=1, image_size=28, num_classes=10, input_mean=[0.286], input_std=[0.353])


def standard_teacher(folder: Path, **overrides) -> Path:
    """A random standard ViT on 28x28 Fashion-MNIST images (7x7 tokens), saved as a run folder."""
    options = {"embed_dim": 32, "depth": 3, "num_heads": 2, **FASHION, **overrides}
    model = create_model("vit_nano_patch4_28", **options)
    save_weights(model, folder / "model.safetensors", {"model_name": "vit_nano_patch4_28"})
    return folder


def align_config(teacher: Path, **overrides):
    """One short epoch aligning the teacher B-cosified (B = 2, no biases) to the teacher."""
    base = dict(
        model="bcos_vit_nano_patch4_28",
        bcosify_from=str(teacher),
        bcosify_warmup_epochs=0.0,
        align_to=str(teacher),
        train_subset=64,
        test_subset=32,
        epochs=1,
        batch_size=32,
    )
    return tiny_config(**{**base, **overrides})


def fresh_student_config(teacher: Path, **overrides):
    """A fresh, narrower and shallower B-cos student aligned to ``teacher`` through projections."""
    options = {"embed_dim": 16, "depth": 2, "num_heads": 2}
    return align_config(teacher, bcosify_from=None, model_options=options, **overrides)


def test_aligned_depths_are_a_third_two_thirds_and_the_last_block():
    assert aligned_depths(12) == (4, 8, 12) and aligned_depths(5) == (1, 3, 5) and aligned_depths(3) == (1, 2, 3)


def test_alignment_loss_decreases_over_a_few_steps(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    net = AlignmentNet(bcos_student(str(teacher), 10), load_teacher(str(teacher)))
    images = torch.rand(48, 1, 28, 28)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = net(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and 0 < losses[-1] < 0.9 * losses[0]
    assert not any(p.requires_grad for p in net.teacher.parameters())
    assert not any(p.requires_grad for p in net.student.head.parameters())  # not part of the loss


class PermutedLabels(Dataset):
    """A dataset whose labels are a fixed permutation of the classes."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.classes = dataset, getattr(dataset, "classes", None)
        self.permutation = torch.randperm(10, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self) -> torch.Tensor:
        return self.permutation[torch.as_tensor(dataset_labels(self.dataset))]

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, int(self.permutation[label])


def test_alignment_reads_no_labels_the_same_student_whatever_the_labels(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    permuted_splits = []
    for seed in (1, 2):

        def permuted(name, split, *args, seed=seed, **kwargs):
            dataset, spec = load_dataset(name, split, *args, **kwargs)
            if split == "train":
                permuted_splits.append(seed)
            return (PermutedLabels(dataset, seed) if split == "train" else dataset), spec

        train(align_config(teacher, epochs=1), tmp_path / f"labels{seed}", progress=False, dataset_loader=permuted)
    assert permuted_splits == [1, 2]  # each run read its train split with other labels
    a = load_file(str(tmp_path / "labels1" / "model.safetensors"))
    b = load_file(str(tmp_path / "labels2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((tmp_path / "labels1" / "metrics.jsonl").read_text().splitlines()[0])
    assert "train_top1" not in metrics and metrics["teacher_forwards"] == 64 and metrics["train_images_per_s"] > 0


def test_a_different_shape_teacher_aligns_through_projections_and_resumes_exactly(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher", embed_dim=48, depth=4)
    config = fresh_student_config(teacher, epochs=2)
    a, b = straight_and_resumed(config, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert state["align_projections"]["0.weight"].shape == (48, 16)  # student width -> teacher width
    model = load_model(tmp_path / "straight")  # an ordinary model: the projections stay behind
    assert model.embed_dim == 16 and model.config.depth == 2 and model.is_bcos


def test_alignment_refuses_label_options_and_unknown_teachers(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="without labels.*mixup"):
        align_config(teacher, mixup=0.2).validate()
    with pytest.raises(ConfigError, match="neither a run folder nor a model with shipped weights"):
        train(align_config(teacher, align_to="no-such-teacher"), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="patch tokens one to one"):
        AlignmentNet(bcos_student(str(teacher), 10), create_model("vit_nano_patch4_28", **{**FASHION, "patch_size": 7}))


def test_align_command_aligns_then_trains_only_the_head_into_ordinary_run_folders(tmp_path, capsys):
    teacher = standard_teacher(tmp_path / "teacher")
    out = tmp_path / "aloe"
    args = ["align", "--teacher", str(teacher), "--out", str(out), "--data-dir", SUBSET, "--epochs", "1"]
    args += ["--batch-size", "32", "--no-progress"]
    args += ["--set", "train_subset=64", "--set", "test_subset=32", "--set", "explain_examples=false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "aligning to" in printed and "linear probe" in printed
    aligned = load_file(str(out / "align" / "model.safetensors"))
    probed = load_file(str(out / "head" / "model.safetensors"))
    assert aligned.keys() == probed.keys()
    changed = sorted(k for k in aligned if not torch.equal(aligned[k], probed[k]))
    assert changed and all(k.startswith("head.") for k in changed)  # a linear probe on frozen features
    model = load_model(out / "head").double()
    assert model.is_bcos and model.config.b == 2.0 and not model.config.bias
    expl = explain(model, torch.rand(2, 1, 28, 28, dtype=torch.float64))
    assert float(expl.completeness_error.abs().max()) < 1e-8
    stored = json.loads((out / "align" / "config.json").read_text())
    assert stored["align_to"] == str(teacher) and stored["bcosify_from"] == str(teacher)
    assert json.loads((out / "head" / "config.json").read_text())["align_to"] is None


@pytest.mark.ddp
@needs_torchrun
def test_align_under_torchrun_runs_both_stages_in_one_process_group(tmp_path):
    teacher = standard_teacher(tmp_path / "teacher", embed_dim=48, depth=4)
    out = tmp_path / "aloe"
    args = ["-m", "bcosvit", "align", "--teacher", str(teacher), "--student", "bcos_vit_nano_patch4_28"]
    args += ["--out", str(out), "--data-dir", SUBSET, "--epochs", "1", "--batch-size", "32", "--no-progress"]
    args += ["--set", "train_subset=64", "--set", "test_subset=32", "--set", "explain_examples=false"]
    args += ["--set", 'model_options={"embed_dim": 16, "depth": 2, "num_heads": 2}']
    ddp = torchrun_two(*args)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 process(es)" in ddp.stdout and load_model(out / "head").embed_dim == 16


def test_a_headless_dinov2_shaped_timm_teacher_aligns_on_fashion_mnist_without_labels():
    """ALOE on a foundation backbone: a tiny DINOv2-shaped timm teacher (patch 14, LayerScale, four
    registers, no head) converted by from_timm, its B-cosified student aligned on real images read as
    RGB at the teacher's size; the loss reads images only."""
    timm = pytest.importorskip("timm")
    from torch.utils.data import DataLoader, Subset

    from bcosvit.bcosification import bcosify, from_timm, remove_biases, set_b

    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=3, embed_dim=48, num_heads=2
    )
    with torch.no_grad():  # trained LayerScales, not timm's 1e-5 init (which Adam's first step would multiply)
        for name, param in backbone.named_parameters():
            if name.endswith(".gamma"):
                param.uniform_(0.1, 0.5)
    teacher = from_timm(backbone.eval())
    assert teacher.num_classes == 0 and teacher.config.reg_tokens == 4 and teacher.config.layer_scale
    student = bcosify(teacher)
    set_b(student, 2.0)
    student = remove_biases(student)
    student.reset_classifier(10)  # for the probe stage after alignment; not part of the loss
    net = AlignmentNet(student.train(), teacher)
    dataset, spec = load_dataset("fashion-mnist", "train", SUBSET, train_transforms=False, image_size=56, in_chans=3)
    assert spec.in_chans == 3 and len(dataset) >= 256
    loader = DataLoader(Subset(dataset, range(256)), batch_size=64, shuffle=False)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-4)
    held = batch_to_device(next(iter(loader))[0], "cpu")
    with torch.no_grad():
        before = net(held).item()
    for _ in range(3):
        for images, _labels in loader:  # the labels are drawn by the loader and never passed on
            loss = net(batch_to_device(images, "cpu"))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = net(held).item()
    assert 0 < after < 0.8 * before
