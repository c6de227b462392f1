"""The command line's memory policy (``bcosvit.app.allocator``): freed memory stays in the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bcosvit.app import cli

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc's malloc only"
)

# A training step's pattern: three 40 MB activations alive at once, freed, allocated again. glibc's
# defaults map blocks over 32 MB afresh each time (smaller ones once their freed heap top is trimmed),
# so every round faults its memory in again.
ROUNDS_SCRIPT = """
import resource, sys, torch
from bcosvit.app.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "kept" else False
def round_():
    held = [torch.ones(10_000_000) for _ in range(3)]
    return sum(float(t[0]) for t in held)
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.pop("BCOSVIT_KEEP_FREED_MEMORY", None)
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS_SCRIPT, mode], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return out[0], int(out[1])


@glibc_linux
def test_kept_freed_memory_stops_repeated_allocations_from_faulting_pages_in_again():
    applied, kept = _faults("kept")
    default_applied, default = _faults("default")
    assert applied == "True" and default_applied == "False"
    pages_per_round = 3 * 10_000_000 * 4 // 4096
    assert default > 5 * pages_per_round  # glibc's defaults: the pattern faults its memory in each round
    assert kept < pages_per_round  # at most a block's first placement in ten rounds


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BCOSVIT_KEEP_FREED_MEMORY", "0"), ("MALLOC_ARENA_MAX", "2"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")],
)
def test_users_malloc_settings_and_the_opt_out_are_left_alone(monkeypatch, variable, value):
    from bcosvit.app import allocator

    monkeypatch.setenv(variable, value)
    calls = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: calls.append(a))
    assert allocator.keep_freed_memory() is False
    assert calls == []


def test_the_bcosvit_command_applies_the_policy_and_main_alone_does_not(monkeypatch):
    applied = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: applied.append(True) or True)
    monkeypatch.setattr(sys, "argv", ["bcosvit", "--help"])
    with pytest.raises(SystemExit):
        cli.run()
    assert applied == [True]
    applied.clear()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert applied == []
