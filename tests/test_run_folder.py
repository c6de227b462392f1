"""A run folder's state is read as untrusted input: what ``bcosvit train`` would not have written is refused."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from bcosvit.app.training import TrainConfig, run_folder, train
from bcosvit.app.training.run_folder import finished_epochs, load_resume_state, writing_run_folder
from bcosvit.errors import CheckpointError, ConfigError

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


def tiny(**overrides) -> TrainConfig:
    from tests.test_train import tiny_config

    return tiny_config(**overrides)


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with writing_run_folder(out):
        with pytest.raises(ConfigError, match=rf"{out} is being written by another bcosvit run \(PID {os.getpid()}\)"):
            train(tiny(epochs=1), out, progress=False)
        with pytest.raises(ConfigError, match="being written by another"):
            train(tiny(epochs=1), out, resume=True, progress=False)
    assert not (out / "state.pt").exists()


def test_the_lock_of_a_killed_run_is_recovered(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(ConfigError, match=f"PID {holder.pid}"):
        train(tiny(epochs=1), out, progress=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    train(tiny(epochs=1), out, progress=False)  # the kernel released the dead process's lock
    assert finished_epochs(out, tiny(epochs=1)) == 1


HOLD_LOCK = """
import sys, time
from pathlib import Path
from bcosvit.app.training.run_folder import writing_run_folder
with writing_run_folder(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_full_disk_while_saving_keeps_the_previous_epoch_and_says_how_to_go_on(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny(), out, progress=False, stop_after=1)
    saved = (out / "state.pt").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder.torch, "save", disk_full)
    expected = r"cannot save epoch 2 .*No space left on device.*after epoch 1.*--resume"
    with pytest.raises(CheckpointError, match=expected):
        train(tiny(), out, resume=True, progress=False)
    assert (out / "state.pt").read_bytes() == saved and not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    assert train(tiny(), out, resume=True, progress=False)["epoch"] == 2


def test_a_run_folder_without_room_for_a_save_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(ConfigError, match=r"has 0 MiB free, but saving the run needs about \d+ MiB"):
        train(tiny(epochs=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "state.pt").exists()
