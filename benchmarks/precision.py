"""Training throughput of the main job's models in each precision, on the machine it runs on.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/precision.py --json benchmarks/results/precision.json

Times one full training step (forward, loss, backward, clipping, optimizer step) of the main job's
B-cos model ``bcos_vitc_micro_28`` and its standard twin ``vitc_micro_28`` (28x28 greyscale, 10
classes, the ``fmnist-demo`` recipe's batch) in float32, under bf16 autocast, and ``torch.compile``d
in float32, B-cos and twin interleaved, median of ``--repeats`` rounds. Prints the CPU's extensions
and the precision that ``precision = "auto"`` (the default of ``bcosvit train``) picks here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from throughput import (
    Row,
    Setting,
    benchmark_setting_rows,
    format_table,
    log,
    machine_info,
    machine_line,
    non_negative_int,
    positive_int,
    run_record,
    write_results,
)

from bcosvit.app.training import load_recipe

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "precision.json"


def main_job_setting() -> Setting:
    main_job = load_recipe("fmnist-demo").stages[0].config
    return Setting(
        "main", main_job.model, batch=main_job.batch_size, quick_batch=16, image_size=28, num_classes=10, in_chans=1
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds before timing")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 16")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write all numbers")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setting = main_job_setting()
    machine = machine_info()
    log(machine_line(machine))
    batch = setting.quick_batch if args.quick else setting.batch
    log(f"[main] {setting.describe(batch)}")
    rows: list[Row] = benchmark_setting_rows(
        setting,
        batch,
        repeats=args.repeats,
        warmup=args.warmup,
        precisions=("fp32", "bf16"),
        inference=False,
        compiled=not args.no_compile,
    )
    print(machine_line(machine))
    print(f"CPU extensions: {', '.join(k for k, v in machine['cpu_features'].items() if v) or 'none of AVX2/AVX512'}")
    print(f"main job: {setting.describe(batch)}; median of {args.repeats} interleaved repeats")
    print()
    print(format_table(rows))
    print(f"\nbcosvit train with precision 'auto' picks: {machine['precision_auto']}")
    write_results(
        args.json,
        {
            **run_record(args, argv),
            "machine": machine,
            "setting": setting.describe(batch),
            "rows": [row.to_dict() for row in rows],
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
