"""How closely the converted published ViTs compute the reference implementation's function.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/reference_equivalence.py --json benchmarks/results/reference_equivalence.json

For each of the 16 published configurations (8 B-cos ViTs, 8 standard twins) of the reference
package ``bcos`` 0.1.3: a randomly initialised reference model (norm scales and biases randomised
too), converted with ``bcosvit.weights.convert.convert_official``, both run in float64 on the same two
random images. Reports the largest logit difference relative to the largest logit and, for B-cos
models, the largest difference between ``bcosvit.explain(...).weights`` and the reference's
gradient with respect to its 6-channel input in its explanation mode, relative to the largest
weight. The comparison is the one ``tests/test_convert.py`` runs at 64×64 px.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from throughput import log, machine_info, machine_line, positive_int, run_record, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bcosvit.weights.convert import convert_official  # noqa: E402
from bcosvit.weights.published import OFFICIAL_NAMES  # noqa: E402
from tests.test_convert import ENTRIES, compare, reference_model  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "reference_equivalence.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--image-size", type=positive_int, default=224, help="input images (a multiple of 16)")
    parser.add_argument("--seeds", type=positive_int, default=1, help="random reference models per configuration")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write all numbers")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log(machine_line(machine_info()))
    rows = []
    for entry in ENTRIES:
        for standard in (False, True):
            name = OFFICIAL_NAMES[entry] if not standard else OFFICIAL_NAMES[entry][len("bcos_") :]
            worst_logit, worst_explanation = 0.0, None
            start = time.perf_counter()
            for seed in range(args.seeds):
                reference = reference_model(entry, standard, seed)
                model = convert_official(reference.state_dict())
                logit, explanation = compare(reference, model, standard, args.image_size)
                worst_logit = max(worst_logit, logit)
                if explanation is not None:
                    worst_explanation = max(worst_explanation or 0.0, explanation)
            rows.append(
                {
                    "model": name,
                    "reference": ("standard_" if standard else "") + entry,
                    "max_logit_rel_diff": worst_logit,
                    "max_explanation_rel_diff": worst_explanation,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            log(f"{name}: done")
    print("| model | reference entry point | max logit diff (rel.) | max explanation diff (rel.) |")
    print("|---|---|---|---|")
    for row in rows:
        explanation = "—" if row["max_explanation_rel_diff"] is None else f"{row['max_explanation_rel_diff']:.1e}"
        print(f"| `{row['model']}` | `{row['reference']}` | {row['max_logit_rel_diff']:.1e} | {explanation} |")
    write_results(args.json, {**run_record(args, argv), "machine": machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
