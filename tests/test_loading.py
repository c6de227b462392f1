"""The train loader: each item's augmentation depends on (run seed, epoch, index) only, so worker
counts, persistent workers and ``--resume`` do not change what a run trains on."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bcosvit.app.data import load_dataset
from bcosvit.app.loading import SeededItems, SeededSampler, collate_images, epoch_item_seeds, pins_memory

from .imagenet_tree import make_imagenet_tree
from .test_train import straight_and_resumed, tiny_config

SEED = 5


@pytest.fixture(scope="module")
def augmented(tmp_path_factory) -> Dataset:
    """12 JPEGs through the folder training pipeline (random resized crop, flip, RandAugment 9)."""
    tree = make_imagenet_tree(tmp_path_factory.mktemp("tree"), num_classes=4, train_per_class=3, splits=("train",))
    return load_dataset("folder", "train", tree, 16, True, randaugment=9)[0]


def seeded_loader(dataset: Dataset, num_workers: int) -> tuple[SeededSampler, DataLoader]:
    """The train loader as ``build_data`` makes it, for one process, batches of 4."""
    shuffled = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED, drop_last=True)
    sampler = SeededSampler(shuffled, SEED)
    loader = DataLoader(
        SeededItems(dataset), 4, sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    return sampler, loader


def epochs_of(sampler: SeededSampler, loader: DataLoader, epochs: list[int]) -> list[list[torch.Tensor]]:
    """The image batches of each of ``epochs``, in order, ``set_epoch`` called as the training loop does."""
    batches = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        batches.append([images for images, _ in loader])
    return batches


def same_batches(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y, strict=True)) for x, y in zip(a, b)
    )


def test_the_same_items_come_out_with_no_workers_and_with_two_persistent_ones(augmented):
    in_process = epochs_of(*seeded_loader(augmented, 0), [1, 2])
    in_workers = epochs_of(*seeded_loader(augmented, 2), [1, 2])
    assert same_batches(in_process, in_workers)
    assert not same_batches(in_process[:1], in_process[1:])  # each epoch its own order and augmentation


def test_a_new_loader_started_at_epoch_two_gives_what_persistent_workers_give_in_their_second_epoch(augmented):
    # what --resume does: new workers, first used at the epoch after the saved one
    persistent = epochs_of(*seeded_loader(augmented, 2), [1, 2])
    resumed = epochs_of(*seeded_loader(augmented, 2), [2])
    assert same_batches(persistent[1:], resumed)


def test_reading_an_item_leaves_the_main_process_random_state_as_it_was(augmented):
    # with num_workers=0 the items are read in the training process: its draws (mixup) must not move
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    SeededItems(augmented)[3, 1234]
    assert torch.equal(torch.rand(3), expected)


def test_the_sampler_keeps_the_distributed_order_and_seeds_each_index_by_seed_epoch_and_index(augmented):
    shuffled = DistributedSampler(augmented, num_replicas=2, rank=1, shuffle=True, seed=SEED, drop_last=True)
    sampler = SeededSampler(shuffled, SEED)
    sampler.set_epoch(3)
    pairs = list(sampler)
    seeds = epoch_item_seeds(SEED, 3, len(augmented))
    assert [index for index, _ in pairs] == list(shuffled) and len(sampler) == len(shuffled) == 6
    assert all(seed == seeds[index] for index, seed in pairs)
    assert (epoch_item_seeds(SEED, 3, 12) == seeds).all()
    assert (epoch_item_seeds(SEED, 4, 12) != seeds).all() and (epoch_item_seeds(SEED + 1, 3, 12) != seeds).all()
    assert seeds.min() >= 0 and seeds.max() < 2**32  # torch's CPU generator keeps 32 bits of a seed


class _Items(Dataset):
    """``images[i], i``."""

    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in process", "in a worker"])
def test_batches_keep_the_memory_layout_of_their_images(num_workers):
    # images made from PIL images are (C, H, W) views of (H, W, C) memory: stacked as they are, not transposed
    interleaved = [torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(4)]
    planar = [image.contiguous() for image in interleaved]
    for images, layout in ((interleaved, torch.channels_last), (planar, torch.contiguous_format)):
        loader = DataLoader(_Items(images), 4, num_workers=num_workers, collate_fn=collate_images)
        batch, labels = next(iter(loader))
        assert batch.is_contiguous(memory_format=layout) and torch.equal(batch, torch.stack(images))
        assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["fashion-mnist", "folder"])
def test_a_run_resumed_with_persistent_workers_ends_bit_identical_to_an_uninterrupted_one(tmp_path, dataset):
    # persistent workers live through the epochs of one invocation; a resumed run starts new ones
    config = tiny_config(epochs=2, randaugment=3, num_workers=2)
    if dataset == "folder":  # 4 ImageNet classes at 16 px: the folder pipeline, RandAugment on PIL images
        tree = make_imagenet_tree(tmp_path / "tree", num_classes=4, train_per_class=8, val_per_class=2)
        folder = dict(data_dir=str(tree), image_size=16, train_subset=None, test_subset=None, batch_size=8)
        config = tiny_config(epochs=2, randaugment=9, num_workers=2, dataset="folder", **folder)
    straight, resumed = straight_and_resumed(config, tmp_path)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_loaders_pin_their_batches_for_cuda_only():
    # pinned host memory makes batch_to_device's non_blocking copy asynchronous; on the CPU it only costs
    assert pins_memory(torch.device("cuda", 0)) and not pins_memory(torch.device("cpu"))
