"""Sharpness at the end of training, per method: the paper's flatter-minima claim, measured.

    python benchmarks/sharpness.py [--config configs/demo.toml] [--methods fedavg,ffa,rolora,aslora]
                                   [--seeds 1] [--examples 64] [--data-dir ../shared/data]

Trains each method on the config (same seeds, same shards), then, at the
final global adapter, measures the training loss's Hessian in the LoRA
factors (all layers, A and B): its largest eigenvalue by power iteration and
its trace by Hutchinson (aslora.sharpness), on a fixed sample of the
clients' training examples, dropout off. Prints one table.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from datasets import concatenate_datasets
from rich.console import Console
from rich.table import Table

from aslora.checkpoint import load_checkpoint
from aslora.config import ExperimentConfig, load_config
from aslora.experiment import prepare, run_experiment
from aslora.sharpness import measure

REPO = Path(__file__).resolve().parents[1]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    parser.add_argument("--methods", default="fedavg,ffa,rolora,aslora")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--data-dir", default=os.environ.get("ASLORA_DATA_DIR", str(REPO.parent / "shared" / "data")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = load_config(args.config).with_overrides({"data.dir": args.data_dir})
    table = Table(title=f"Hessian of the training loss in the LoRA factors, at the end ({args.config.name})")
    for column in ("method", "seeds", "final metric", "top eigenvalue", "trace (Hutchinson)", "s"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            finals, tops, traces, errors, started = [], [], [], [], time.perf_counter()
            for seed in range(args.seeds):
                config = base.with_overrides({"method": method, "seed": base.seed + seed, "output_dir": tmp})
                result = run_experiment(config)
                metric = next(k for k in result.summary["final_metrics"] if not k.endswith("loss"))
                finals.append(result.summary["final_metrics"][metric])
                top, trace, error = final_sharpness(config, result.directory, args.examples)
                tops.append(top)
                traces.append(trace)
                errors.append(error)
            table.add_row(
                method, str(args.seeds), f"{np.mean(finals):.4f}", f"{np.mean(tops):.4g} +- {np.std(tops):.2g}",
                f"{np.mean(traces):.4g} +- {np.std(traces):.2g} (probe s.e. {np.mean(errors):.2g})",
                f"{time.perf_counter() - started:.0f}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
