"""A run folder's state is read as untrusted input: what ``bcosvit train`` would not have written is refused."""

from __future__ import annotations

import os

import pytest
import torch

from bcosvit.app.training import TrainConfig
from bcosvit.app.training.run_folder import finished_epochs, load_resume_state
from bcosvit.errors import CheckpointError

CONFIG = TrainConfig(model="bcos_vit_nano_patch4_28", epochs=3)


def _state(epoch: int, history_lines: int) -> dict:
    history = [{"epoch": e + 1} for e in range(history_lines)]
    return {"epoch": epoch, "config": CONFIG.to_dict(), "history": history, "model": {}, "optimizer": {}, "ema": None}


@pytest.mark.parametrize(("epoch", "lines"), [(10**9, 10**0), (10**9, 0), (2, 1)])
def test_a_state_claiming_more_epochs_than_its_run_or_its_history_is_refused(tmp_path, epoch, lines):
    # a crafted epoch of 10^9 made --resume skip the stage as finished
    torch.save(_state(epoch, lines), tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="epochs of 3 are done with .* epochs of history"):
        finished_epochs(tmp_path, CONFIG)


def test_a_consistent_state_is_accepted(tmp_path):
    torch.save(_state(2, 2), tmp_path / "state.pt")
    assert finished_epochs(tmp_path, CONFIG) == 2


def test_a_state_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"named pipe \(FIFO\), not a state file"):
        load_resume_state(tmp_path, CONFIG)
