"""Sharpness at the end of training, per method: the paper's flatter-minima claim, measured.

    python benchmarks/sharpness.py [--config configs/demo.toml] [--methods fedavg,ffa,rolora,aslora]
                                   [--seeds 1] [--examples 64] [--data-dir ../shared/data]
    python benchmarks/sharpness.py --runs benchmarks/paper/runs/sst2-epsinf

Trains each method on the config (same seeds, same shards), then, at the
final global adapter, measures the training loss's Hessian in the LoRA
factors (all layers, A and B): its largest eigenvalue by power iteration and
its trace by Hutchinson (aslora.sharpness), on a fixed sample of the
clients' training examples, dropout off. Prints one table. With --runs it
trains nothing and measures the finished runs of one paper_table.py cell (the
listed variants, seeds 0 to --seeds - 1), e.g. the reference without DP, where the methods learn.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from data_dir import add_data_dir
from datasets import concatenate_datasets
from rich.console import Console
from rich.table import Table

from aslora.checkpoint import load_checkpoint
from aslora.config import ExperimentConfig, load_config, parse_config
from aslora.experiment import prepare, run_experiment
from aslora.sharpness import measure

REPO = Path(__file__).resolve().parents[1]
Measured = tuple[str, ExperimentConfig, Path]  # (method or ablation, its config, its run directory)


def final_sharpness(config: ExperimentConfig, run_dir: Path, examples: int) -> tuple[float, float, float]:
    """(top eigenvalue, trace, its standard error) at the run's final global adapter."""
    setup = prepare(config)
    state = load_checkpoint(run_dir).state
    view, task = setup.view, setup.task
    view.set_factors(state.factors)
    view.set_head(state.head)
    view.set_residual(state.residual)
    pooled = concatenate_datasets(setup.shards).shuffle(seed=config.seed)
    batch = task.encode(pooled.select(range(min(examples, len(pooled))))).tensors
    params = [view.parameter(layer, f) for layer in view.layers for f in ("A", "B")]
    for p in view.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    view.model.eval()
    result = measure(lambda: task.loss(view.model, batch), params, iterations=20, probes=30, seed=config.seed)
    return result.top_eigenvalue, result.trace, result.trace_std_error


def trained(base: ExperimentConfig, methods: list[str], seeds: int, out: str) -> Iterator[Measured]:
    """Train each method for each seed on `base`, then hand over its run."""
    for method in methods:
        for seed in range(seeds):
            config = base.with_overrides({"method": method, "seed": base.seed + seed, "output_dir": out})
            yield method, config, run_experiment(config).directory


def finished(grid: Path, methods: list[str], seeds: int, data_dir: str) -> Iterator[Measured]:
    """The finished runs of `methods`, seeds 0..seeds-1, in a paper_table.py folder (<variant>-s<seed>/<run id>/)."""
    for summary in sorted(grid.glob("*-s*/*/summary.json")):
        run_dir = summary.parent
        variant, seed = run_dir.parent.name.rsplit("-s", 1)
        if variant in methods and int(seed) < seeds:
            stored = json.loads((run_dir / "config.json").read_text())["config"]
            yield variant, parse_config(stored).with_overrides({"data.dir": data_dir}), run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    parser.add_argument("--methods", default="fedavg,ffa,rolora,aslora", help="with --runs, folder names: aslora-tied")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--runs", type=Path, help="measure the finished runs of one paper_table.py cell instead of training")
    parser.add_argument("--examples", type=int, default=64)
    add_data_dir(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    source = args.runs or args.config
    table = Table(title=f"Hessian of the training loss in the LoRA factors, at the end ({source})")
    for column in ("method", "seeds", "final metric", "top eigenvalue", "trace (Hutchinson)", "s"):
        table.add_column(column, justify="right")
    rows: dict[str, list[tuple[float, float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.runs is not None:
            runs = finished(args.runs, args.methods.split(","), args.seeds, args.data_dir)
        else:
            base = load_config(args.config).with_overrides({"data.dir": args.data_dir})
            runs = trained(base, args.methods.split(","), args.seeds, tmp)
        started = time.perf_counter()
        for method, config, run_dir in runs:
            final = json.loads((run_dir / "summary.json").read_text())["final_metrics"]
            metric = next(k for k in final if not k.endswith("loss"))
            top, trace, error = final_sharpness(config, run_dir, args.examples)
            rows.setdefault(method, []).append((final[metric], top, trace, error, time.perf_counter() - started))
            started = time.perf_counter()
    for method, measured in rows.items():
        finals, tops, traces, errors, seconds = (np.array(column) for column in zip(*measured, strict=True))
        table.add_row(
            method, str(len(measured)), f"{finals.mean():.4f}", f"{tops.mean():.4g} +- {tops.std():.2g}",
            f"{traces.mean():.4g} +- {traces.std():.2g} (probe s.e. {errors.mean():.2g})", f"{seconds.sum():.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
