"""Plots (matplotlib) and tables (rich) of finished runs."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from aslora.diagnostics import calibration_pairs, share_of_a, summarise

if TYPE_CHECKING:
    from aslora.server import RoundRecord


def plot_run(records: Sequence[RoundRecord], path: Path, title: str) -> Path:
    """Task metric and spent epsilon per round, side by side."""
    fig, (ax_metric, ax_eps) = plt.subplots(1, 2, figsize=(10, 4))
    evaluated = [r for r in records if r.metrics]
    for name in evaluated[0].metrics if evaluated else []:
        if name.endswith("loss"):
            continue
        ax_metric.plot([r.round for r in evaluated], [r.metrics[name] for r in evaluated], marker="o", label=name)
    ax_metric.set(xlabel="round", ylabel="metric", title="global model")
    ax_metric.xaxis.set_major_locator(MaxNLocator(integer=True))
    if evaluated:
        ax_metric.legend()
    eps = [(r.round, r.epsilon) for r in records if r.epsilon is not None]
    if eps:
        ax_eps.plot(*zip(*eps, strict=True), marker="o")
    ax_eps.set(xlabel="round", ylabel="epsilon (max over clients)", title="privacy spent")
    ax_eps.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_mask(records: Sequence[RoundRecord], path: Path, title: str) -> Path:
    """The layer x round map of the factor each layer trained (AS-LoRA's choices)."""
    layers = list(records[0].mask)
    grid = np.array([[1.0 if "A" in r.mask[layer] else 0.0 for r in records] for layer in layers])
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(records) + 2), max(3, 0.25 * len(layers) + 1)))
    ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(layers)), [_short(layer) for layer in layers], fontsize=7)
    ax.set_xticks(range(len(records)), [str(r.round) for r in records], fontsize=7)
    ax.set(xlabel="round", title=f"{title}: trained factor (red A, blue B)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_calibration(records: Sequence[RoundRecord], path: Path, title: str) -> Path:
    """Left: the score the decision read against the realised probe-loss decrease, per round and
    layer (selection diagnostics). Right: the share of rounds each layer trained A."""
    pairs = calibration_pairs(records)
    shares = share_of_a(records)
    fig, (ax_cal, ax_share) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for factor, colour in (("A", "tab:red"), ("B", "tab:blue")):
        chosen = [(p, r) for p, r, f in pairs if f == factor]
        if chosen:
            ax_cal.scatter(*zip(*chosen, strict=True), s=12, alpha=0.6, color=colour, label=f"{factor} trained")
    if pairs:
        low = min(min(p, r) for p, r, _ in pairs)
        high = max(max(p, r) for p, r, _ in pairs)
        ax_cal.plot([low, high], [low, high], color="grey", lw=0.8, ls="--", label="realised = predicted")
        ax_cal.legend(fontsize="small")
    rho = summarise(records).get("spearman_predicted_realised")
    ax_cal.set(xlabel="predicted decrease (score)", ylabel="realised decrease (probe loss)",
               title=f"calibration, Spearman {rho:.2f}" if rho is not None else "calibration (no scored rounds)")
    ax_share.barh(range(len(shares)), list(shares.values()), color="tab:red")
    ax_share.set_yticks(range(len(shares)), [_short(layer) for layer in shares], fontsize=7)
    ax_share.set(xlim=(0, 1), xlabel="share of rounds on A", title="per layer")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(layer: str) -> str:
    """'bert.encoder.layer.3.attention.self.query' -> 'layer.3.query'."""
    parts = layer.split(".")
    numbered = [f"{p}.{n}" for p, n in pairwise(parts) if n.isdigit()]
    return ".".join([*numbered[-1:], *([] if parts[-1].isdigit() else parts[-1:])])


def rounds_to_reach(summary: dict[str, Any], metric: str, target: float) -> int | None:
    """Rounds until the evaluated metric first reaches `target` (None if never).

    Metrics named *error or *loss reach it from above, the others from below.
    """
    lower_is_better = metric.endswith(("error", "loss"))
    for round_index, values in sorted(summary["metric_by_round"].items(), key=lambda kv: int(kv[0])):
        value = values.get(metric)
        if value is not None and (value <= target if lower_is_better else value >= target):
            return int(round_index) + 1
    return None


def comparison_table(summaries: Sequence[dict[str, Any]], metric: str, target: float | None = None) -> Table:
    """One row per method: mean and spread of the final metric over seeds, and costs."""
    table = Table(
        title=f"final {metric} (global model)",
        caption="agg err: ALGORITHM.md section 5; agg ms: server aggregation per round; "
        "up/down: bytes per client per round",
    )
    reach_column = [] if target is None else [f"rounds to {target:g}"]
    for column in ("method", "seeds", metric[:8], *reach_column, "eps", "agg err", "agg ms", "up", "down", "wall"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        by_method.setdefault(s["method"], []).append(s)
    for method, runs in by_method.items():
        finals = np.array([r["final_metrics"].get(metric, np.nan) for r in runs], dtype=float)
        spread = f" ± {finals.std(ddof=1):.4f}" if len(finals) > 1 else ""
        eps = [r["epsilon"] for r in runs if r["epsilon"] is not None]
        rounds = max(1, np.mean([r["rounds_completed"] for r in runs]))
        reach = []
        if target is not None:
            hits = [n for n in (rounds_to_reach(r, metric, target) for r in runs) if n is not None]
            reach = [f"{np.mean(hits):.1f} ({len(hits)}/{len(runs)})" if hits else f"never (0/{len(runs)})"]
        errors = [r["mean_agg_error"] for r in runs if r["mean_agg_error"] is not None]
        table.add_row(
            method,
            str(len(runs)),
            f"{np.nanmean(finals):.4f}{spread}",
            *reach,
            f"{max(eps):.3f}" if eps else "no DP",
            f"{np.mean(errors):.2g}" if errors else "n/a",
            f"{np.mean([r['total_agg_time_s'] for r in runs]) / rounds * 1e3:.2f}",
            _size(np.mean([r["mean_bytes_up_per_client"] for r in runs])),
            _size(np.mean([r["mean_bytes_down_per_client"] for r in runs])),
            f"{np.mean([r['wall_time_s'] for r in runs]):.0f} s",
        )
    return table


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plot_comparison(curves: dict[str, list[dict[int, dict[str, float]]]], metric: str, path: Path) -> Path:
    """Metric vs round per method: mean over seeds, shaded min-max."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    # the default cycle repeats after 10 colours; the paper table has 11 variants
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (method, runs) in enumerate(curves.items()):
        rounds = sorted(set.intersection(*(set(r) for r in runs)))
        if not rounds:
            continue
        values = np.array([[run[r][metric] for r in rounds] for run in runs])
        ax.plot(rounds, values.mean(0), marker="o", label=method, color=colours(i))
        if len(runs) > 1:
            ax.fill_between(rounds, values.min(0), values.max(0), alpha=0.2, color=colours(i))
    ax.set(xlabel="round", ylabel=metric, title=f"{metric} of the global model")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")  # outside: never over a curve
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
