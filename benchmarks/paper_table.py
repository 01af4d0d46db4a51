"""The paper's comparison at CPU scale: every method and AS-LoRA ablation, on SST-2, QNLI and MNLI,
at epsilon 1, 3 and 6, over several seeds; mean and spread of the final metric, and curves.

    python benchmarks/paper_table.py run   [--tasks sst2,qnli,mnli] [--epsilons 1,3,6] [--seeds 3] [--variants ...]
                                           [--data-dir ../shared/data]
    python benchmarks/paper_table.py table [--out benchmarks/paper]

`run` works through the grid in parts (any subset of tasks, epsilons, seeds and
variants) and can be stopped at any time: a finished run is skipped, an
interrupted one resumes from its last checkpoint. `table` writes
`<out>/TABLE.md` and one plot of metric vs round per (task, epsilon) from
whatever has finished, with the wall time, the machine and the commands.
The configurations are configs/paper/<task>.toml.

Epsilon `inf` (`--epsilons 1,3,6,inf`) is the reference without DP. It trains with NO_DP's settings,
not the DP ones: at the DP settings (SGD, batch 32, 3 local steps) nothing
learns in 5 rounds even without noise, so that column would show nothing
either (benchmarks/RESULTS.md, "Why nothing learns under DP at CPU scale").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from data_dir import add_data_dir

from aslora.config import load_config
from aslora.experiment import run_experiment
from aslora.methods import ABLATIONS
from aslora.report import plot_comparison

REPO = Path(__file__).resolve().parents[1]
METHODS = ("fedavg", "ffa", "rolora", "fedsa", "fedex", "flora", "fedsvd", "aslora")
VARIANTS = {m: {"method": m} for m in METHODS} | ABLATIONS
# The reference without DP: settings under which MiniLM learns in 5 rounds on 2 cores, on some seeds
# (SST-2 seed 0: 0.61-0.735 per method; seeds 1 and 2: the majority class; benchmarks/RESULTS.md).
NO_DP = {"privacy.enabled": False, "optim.optimizer": "adam", "optim.lr": 0.01, "optim.batch_size": 128, "federation.local_steps": 2}


def privacy_overrides(eps: float) -> dict[str, object]:
    """The config changes for one epsilon of the grid; `inf` is the reference without DP."""
    return dict(NO_DP) if math.isinf(eps) else {"privacy.epsilon": eps}


def _slug(text: str) -> str:
    return text.replace(" ", "-")


def cells(out: Path, tasks: list[str], epsilons: list[float], seeds: int, variants: list[str]) -> Iterator[tuple]:
    """Every (task, epsilon, variant, seed) of the grid with the folder its run lives in."""
    for task in tasks:
        for eps in epsilons:
            for variant in variants:
                for seed in range(seeds):
                    yield task, eps, variant, seed, out / "runs" / f"{task}-eps{eps:g}" / f"{_slug(variant)}-s{seed}"


def _finished(folder: Path) -> Path | None:
    done = sorted(folder.glob("*/summary.json"))
    return done[-1] if done else None


def run(out: Path, tasks: list[str], epsilons: list[float], seeds: int, variants: list[str], data_dir: str) -> None:
    for task, eps, variant, seed, folder in cells(out, tasks, epsilons, seeds, variants):
        if _finished(folder):
            continue
        config = load_config(REPO / "configs" / "paper" / f"{task}.toml").with_overrides(
            {**VARIANTS[variant], **privacy_overrides(eps), "seed": seed, "output_dir": str(folder), "data.dir": data_dir}
        )
        interrupted = sorted(p.parent for p in folder.glob("*/checkpoint.json"))
        started = time.perf_counter()
        result = run_experiment(config, resume=interrupted[-1] if interrupted else None)
        final = result.summary["final_metrics"]
        print(f"{task} eps={eps:g} {variant} seed {seed}: {final} in {time.perf_counter() - started:.0f} s", flush=True)


def _block(out: Path, task: str, eps: float, by_seed: dict[str, dict[int, dict]]) -> list[str]:
    """One (task, epsilon): the table over the seeds that every variant has finished, the other runs named."""
    common = sorted(set.intersection(*(set(runs) for runs in by_seed.values())))
    extra = {v: others for v, runs in by_seed.items() if (others := sorted(set(runs) - set(common)))}
    some_run = next(iter(next(iter(by_seed.values())).values()))
    # every method's own metrics (accuracy, eval loss); FedSA's personalised ones are in its summaries
    metrics = [k for k in some_run["final_metrics"] if "/" not in k]
    heading = f"{task}, no DP (reference: {NO_DP})" if math.isinf(eps) else f"{task}, epsilon {eps:g}"
    lines = [f"## {heading}", ""]
    if common:
        summaries = {variant: [runs[s] for s in common] for variant, runs in by_seed.items()}
        lines += ["| variant | seeds | " + " | ".join(metrics) + " | epsilon spent | wall s / run |",
                  "|---" * (len(metrics) + 4) + "|"]
        for variant, runs in summaries.items():
            values = [f"{np.mean(v):.4f} +- {np.std(v):.4f}" for v in ([r["final_metrics"][m] for r in runs] for m in metrics)]
            spent = "none (no DP)" if math.isinf(eps) else f"{max(r['epsilon'] for r in runs):.3f}"
            wall = np.mean([r["wall_time_s"] for r in runs])
            lines.append(f"| {variant} | {len(runs)} | " + " | ".join(values) + f" | {spent} | {wall:.0f} |")
        curves = {v: [r["metric_by_round"] for r in runs] for v, runs in summaries.items()}
        plot = plot_comparison(curves, metrics[0], out / f"{task}-eps{eps:g}.png")
        lines += ["", f"![{task} epsilon {eps:g}]({plot.name})"]
    if extra:
        finals = "; ".join(f"{v} seed {s}: {by_seed[v][s]['final_metrics'][metrics[0]]:.4f}" for v, ss in extra.items() for s in ss)
        lines += ["", f"Not in the table, so that every row averages the same seeds (final {metrics[0]}): {finals}."]
    return [*lines, ""]


def table(out: Path, tasks: list[str], epsilons: list[float], seeds: int, variants: list[str]) -> Path:
    """TABLE.md: mean +- std of the final metrics per variant, one block per (task, epsilon)."""
    lines, total_wall = [], 0.0
    for task in tasks:
        for eps in epsilons:
            by_seed: dict[str, dict[int, dict]] = {}
            for _, _, variant, seed, folder in cells(out, [task], [eps], seeds, variants):
                path = _finished(folder)
                if path is not None:
                    by_seed.setdefault(variant, {})[seed] = json.loads(path.read_text())
            if by_seed:
                lines += _block(out, task, eps, by_seed)
                total_wall += sum(r["wall_time_s"] for runs in by_seed.values() for r in runs.values())
    head = [
        "# The paper's comparison at CPU scale",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch CPU. Configs: configs/paper/<task>.toml.",
        "Commands: `python benchmarks/paper_table.py run` then `python benchmarks/paper_table.py table`.",
        f"Total wall time of the runs found: {total_wall / 3600:.2f} h.",
        "",
    ]
    path = out / "TABLE.md"
    path.write_text("\n".join(head + lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--tasks", default="sst2,qnli,mnli")
    parser.add_argument("--epsilons", default="1,3,6")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; names with spaces allowed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "paper")
    add_data_dir(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    grid = (args.out, args.tasks.split(","), [float(e) for e in args.epsilons.split(",")], args.seeds, variants)
    if args.action == "run":
        run(*grid, args.data_dir)
    print(table(*grid))


if __name__ == "__main__":
    main()
