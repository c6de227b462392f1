"""``torch.profiler`` tables, by operator, of one train step of a B-cos model and its twin (issue 29).

Reproduce (from the repository root; the main job's model in bf16)::

    .venv/bin/python benchmarks/profile_step.py --setting m --precisions bf16

The step is ``benchmarks/throughput.py``'s (each family's recipe: forward, loss, backward,
clipping, optimizer step); the models and batch are that benchmark's setting. Each table lists the
operators by their own CPU time in one profiled step after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence

import torch
from throughput import SETTINGS, apply_allocator_policy, build_models, make_batch, train_step_fn
from torch.profiler import ProfilerActivity, profile


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="m")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15, help="operators per table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile'd step")
    parser.add_argument("--glibc-malloc-defaults", action="store_true", help="leave glibc's malloc settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = apply_allocator_policy(args.glibc_malloc_defaults)
    setting = SETTINGS[args.setting]
    models = build_models(setting)
    images, labels = make_batch(setting, setting.batch)
    print(f"setting {setting.key}: {setting.describe(setting.batch)}, torch {torch.__version__}, {allocator}")
    for precision in args.precisions:
        for family, model in zip(("B-cos", "twin"), models):
            step = train_step_fn(copy.deepcopy(model), images, labels, precision, compiled=args.compile)
            for _ in range(args.warmup):
                step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            name = setting.bcos_model if family == "B-cos" else setting.standard_model
            print(f"\n{family} {name}, {precision}" + (", torch.compile" if args.compile else ""))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
