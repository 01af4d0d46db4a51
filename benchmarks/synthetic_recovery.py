"""Synthetic low-rank recovery: each method's relative error on the layers whose target is
inside / outside the initial A's row space, and rounds to reach a target error.

    python benchmarks/synthetic_recovery.py [--seeds 3] [--target 0.1]

Runs configs/synthetic.toml (DP-SGD at epsilon 3, 10 non-IID clients) for every
method and AS-LoRA ablation, same seeds, and prints one table.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from aslora.config import load_config
from aslora.experiment import run_experiment
from aslora.methods import ABLATIONS
from aslora.tasks import SyntheticTask

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {m: {"method": m} for m in ("fedavg", "ffa", "rolora", "aslora")} | ABLATIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.1, help="relative error to reach")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    base = load_config(REPO / "configs" / "synthetic.toml")
    table = Table(title=f"synthetic recovery, epsilon {base.privacy.epsilon}, {args.seeds} seeds: final relative error (mean ± std)")
    for column in ("method", "all layers", "inside row space", "outside row space", f"rounds to {args.target}", "s/run"):
        table.add_column(column, justify="left" if column == "method" else "right")
    with tempfile.TemporaryDirectory() as out:
        for label, overrides in VARIANTS.items():
            finals, inside, outside, reach, times = [], [], [], [], []
            for seed in range(args.seeds):
                config = base.with_overrides({**overrides, "seed": seed, "output_dir": out})
                task_inside = SyntheticTask.load(config).inside
                start = time.perf_counter()
                result = run_experiment(config)
                times.append(time.perf_counter() - start)
                final = result.summary["final_metrics"]
                per_layer = [v for k, v in final.items() if k.startswith("rel_error/")]
                flags = list(task_inside.values())
                finals.append(final["rel_error"])
                inside.append(np.mean([e for e, f in zip(per_layer, flags, strict=True) if f]))
                outside.append(np.mean([e for e, f in zip(per_layer, flags, strict=True) if not f]))
                curve = result.summary["metric_by_round"]
                hit = [int(r) + 1 for r, m in curve.items() if m["rel_error"] <= args.target]
                reach.append(min(hit) if hit else np.nan)
            table.add_row(
                label,
                _spread(finals),
                _spread(inside),
                _spread(outside),
                "never" if np.all(np.isnan(reach)) else f"{np.nanmean(reach):.1f} ({int(np.sum(~np.isnan(reach)))}/{len(reach)})",
                f"{np.mean(times):.1f}",
            )
    Console(width=140).print(table)


def _spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


if __name__ == "__main__":
    main()
