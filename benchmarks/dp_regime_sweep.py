"""Find a DP regime in which the federation learns on CPU: a sweep scored on a validation split
carved from the TRAINING data (data.validation_size), never on dev.

    python benchmarks/dp_regime_sweep.py run --config configs/paper/sst2.toml --grid benchmarks/sweep/sst2.toml
                                         [--only NAME,...] [--threads 2] [--data-dir ../shared/data]
    python benchmarks/dp_regime_sweep.py table --results benchmarks/sweep/sst2.jsonl

The grid file names each point of the sweep and its overrides of the base
config (dotted keys, as `[points.NAME]` tables; TOML has no null, so `unset = ["privacy.epsilon"]`
sets keys to None). `run` appends one JSON line
per finished point to the results file beside the grid (`<grid>.jsonl`) and
skips (config, point) pairs already there, so it can be stopped and run again; `table`
prints the points best first, with the settings that differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tomllib
from pathlib import Path

import torch
from data_dir import add_data_dir
from rich.console import Console
from rich.table import Table
from sound_run import require_sound

from aslora.config import ExperimentConfig, dotted, load_config, parse_config
from aslora.experiment import run_experiment


def load_grid(path: Path) -> dict[str, dict[str, object]]:
    """{point name: its dotted overrides} from the grid's `[points.NAME]` tables."""
    points = tomllib.loads(path.read_text()).get("points", {})
    if not points:
        raise SystemExit(f"{path}: no [points.NAME] tables; each names one point of the sweep")
    return {name: dotted(body) for name, body in points.items()}


def done(results: Path) -> set[tuple[str, str]]:
    """(config, point) of every finished row: one grid may serve several base configs."""
    if not results.is_file():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["config"], r["point"]) for r in rows}


def unset(config: ExperimentConfig, keys: list[str]) -> ExperimentConfig:
    """`config` with the dotted `keys` set to None (validated again): a grid point's `unset`."""
    raw = config.model_dump(mode="json")
    for key in keys:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"unset: {key} is not a config key")
        node[leaf] = None
    return parse_config(raw)


def run(
    config_path: Path, grid_path: Path, only: list[str], threads: int, validation: int, data_dir: str, out: Path
) -> None:
    torch.set_num_threads(threads)
    results = grid_path.with_suffix(".jsonl")
    finished = done(results)
    for name, overrides in load_grid(grid_path).items():
        if (str(config_path), name) in finished or (only and name not in only):
            continue
        base = load_config(config_path)
        settings = {k: v for k, v in overrides.items() if k != "unset"}
        config = base.for_method(
            overrides.get("method", base.method),
            {"data.validation_size": validation, "data.dir": data_dir, "output_dir": str(out / name)} | settings,
        )
        config = unset(config, list(overrides.get("unset", [])))
        started = time.perf_counter()
        result = run_experiment(config)
        require_sound(result.summary, config)
        curve = [r.metrics["accuracy"] for r in result.records if r.metrics and "accuracy" in r.metrics]
        row = {
            "point": name,
            "config": str(config_path),
            "overrides": overrides,
            "method": config.method,
            "seed": config.seed,
            "validation_accuracy": result.summary["final_metrics"]["accuracy"],
            "best_validation_accuracy": max(curve) if curve else None,
            "curve": curve,
            "epsilon": result.summary["epsilon"],
            "wall_s": round(time.perf_counter() - started, 1),
            "threads": threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        }
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("point", "validation_accuracy", "epsilon", "wall_s")}))


def table(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: -r["validation_accuracy"])
    out = Table(title=f"{results}: validation accuracy (carved from train), best first")
    for column in ("point", "method", "final", "best over rounds (optimistic)", "epsilon", "wall s", "overrides"):
        out.add_column(column)
    for r in rows:
        best = r["best_validation_accuracy"]
        out.add_row(
            r["point"], r["method"], f"{r['validation_accuracy']:.4f}", "-" if best is None else f"{best:.4f}",
            f"{r['epsilon']:.3f}", f"{r['wall_s']:.0f}", json.dumps(r["overrides"]),
        )
    Console(width=200).print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--config", type=Path, required=True)
    go.add_argument("--grid", type=Path, required=True)
    go.add_argument("--only", default="", help="comma-separated point names")
    go.add_argument("--threads", type=int, default=2)
    go.add_argument("--validation", type=int, default=2000, help="examples carved from train (2,000: s.e. 0.01)")
    go.add_argument("--out", type=Path, default=Path("runs/sweep"))
    add_data_dir(go)
    show = sub.add_parser("table")
    show.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "run":
        only = [p for p in args.only.split(",") if p]
        run(args.config, args.grid, only, args.threads, args.validation, args.data_dir, args.out)
    else:
        table(args.results)


if __name__ == "__main__":
    main()
