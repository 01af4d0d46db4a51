"""Synthetic low-rank recovery: each method's relative error on the layers whose target is
inside / outside the initial A's row space, where it spent its rounds (share on A), how well
its score ranked the realised decreases, and two NON-PRIVATE references.

    python benchmarks/synthetic_recovery.py [--seeds 5] [--target 0.1] [--rows recovery.jsonl [--resume]]
                                            [--variants 'ffa,rolora,aslora random'] [--first-seed 0]
                                            [--also 'aslora beta 0.7:selection.beta=0.7' ...]

Runs configs/synthetic.toml (DP-SGD at epsilon 3, 10 non-IID clients, a 512-example probe set on
the server for the diagnostics) for every method and AS-LoRA ablation on the same seeds, then:
- `oracle`: the lookahead oracle (methods/oracle.py) at the private runs' noise multiplier: it
  trains both factors every round, keeps per layer the one the probe set prefers, and spends
  about 1.2x the epsilon (printed);
- `hindsight`: per seed and layer, the better of always-B (`ffa`) and alternation (`rolora`):
  the best fixed per-layer policy in hindsight, composed from those runs' per-layer errors (layers
  interact only through the joint clip), not a run of its own.
Differences to `aslora` are paired by seed (same partition, targets and initial adapter).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from aslora.config import ExperimentConfig, load_config, parse_config
from aslora.experiment import run_experiment
from aslora.methods import ABLATIONS
from aslora.tasks import SyntheticTask

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {m: {"method": m} for m in ("fedavg", "ffa", "rolora", "aslora")} | ABLATIONS


def run_one(config: ExperimentConfig, label: str, target: float) -> dict:
    """One run's per-layer final errors, shares of rounds on A, calibration and time."""
    inside = list(SyntheticTask.load(config).inside.values())
    start = time.perf_counter()
    result = run_experiment(config)
    final = result.summary["final_metrics"]
    errors = [v for k, v in final.items() if k.startswith("rel_error/")]
    diagnostics = result.summary["selection_diagnostics"]
    shares = list(diagnostics["share_of_rounds_on_a"].values())
    reached = [int(r) + 1 for r, m in result.summary["metric_by_round"].items() if m["rel_error"] <= target]
    return {
        "variant": label, "seed": config.seed, "errors": errors, "inside": inside, "share_a": shares,
        "spearman": diagnostics["spearman_predicted_realised"], "rounds_to_target": min(reached) if reached else None,
        "epsilon": result.summary["epsilon"], "sigma": result.summary["noise_multiplier"],
        "wall_s": round(time.perf_counter() - start, 2),
    }


def extra_variant(text: str) -> tuple[str, dict]:
    """'label:key=value,key=value' -> (label, overrides); values are JSON where they parse."""
    label, _, pairs = text.partition(":")
    overrides: dict = {"method": "aslora"}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    if not label.strip() or len(overrides) == 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write LABEL:KEY=VALUE[,KEY=VALUE...]")
    return label.strip(), overrides


def _part(row: dict, values: str, inside: bool | None) -> float:
    return float(np.mean([v for v, i in zip(row[values], row["inside"], strict=True) if inside is None or i == inside]))


def hindsight(rows: list[dict], seed: int) -> dict:
    """Per layer, the lower final error of always-B (ffa) and alternation (rolora) at this seed."""
    ffa, rolora = (next(r for r in rows if r["variant"] == v and r["seed"] == seed) for v in ("ffa", "rolora"))
    errors = [min(a, b) for a, b in zip(ffa["errors"], rolora["errors"], strict=True)]
    shares = [0.0 if a <= b else 0.5 for a, b in zip(ffa["errors"], rolora["errors"], strict=True)]
    return {"variant": "hindsight", "seed": seed, "errors": errors, "inside": ffa["inside"], "share_a": shares,
            "spearman": None, "rounds_to_target": None, "epsilon": ffa["epsilon"], "sigma": ffa["sigma"], "wall_s": 0.0}


def table(rows: list[dict], seeds: int, epsilon: float, target: float) -> Table:
    out = Table(title=f"synthetic recovery, epsilon {epsilon}, {seeds} seeds: final relative error (mean ± std)")
    for column in ("method", "all layers", "inside", "outside", "vs aslora (paired)", "vs random (paired)", "A share in/out",
                   "Spearman", f"rounds to {target}", "eps", "s/run"):
        out.add_column(column, justify="left" if column == "method" else "right")
    reference = {r["seed"]: _part(r, "errors", None) for r in rows if r["variant"] == "aslora"}
    coin = {r["seed"]: _part(r, "errors", None) for r in rows if r["variant"] == "aslora random"}
    for label in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == label]
        diffs = [_part(r, "errors", None) - reference[r["seed"]] for r in runs if r["seed"] in reference]
        against_coin = [_part(r, "errors", None) - coin[r["seed"]] for r in runs if r["seed"] in coin]
        reach = [r["rounds_to_target"] for r in runs if r["rounds_to_target"] is not None]
        rho = [r["spearman"] for r in runs if r["spearman"] is not None]
        out.add_row(
            label,
            _spread([_part(r, "errors", None) for r in runs]),
            _spread([_part(r, "errors", True) for r in runs]),
            _spread([_part(r, "errors", False) for r in runs]),
            "" if label == "aslora" or not diffs else _spread(diffs, signed=True),
            "" if label == "aslora random" or not against_coin else _spread(against_coin, signed=True),
            f"{np.mean([_part(r, 'share_a', True) for r in runs]):.2f} / {np.mean([_part(r, 'share_a', False) for r in runs]):.2f}",
            f"{np.mean(rho):.2f}" if rho else "",
            f"{np.mean(reach):.1f} ({len(reach)}/{len(runs)})" if reach else "never",
            f"{max(r['epsilon'] for r in runs):.2f}",
            f"{np.mean([r['wall_s'] for r in runs]):.1f}",
        )
    return out


def _spread(values: list[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{np.mean(values):{sign}.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument(
        "--variants", type=lambda text: [v.strip() for v in text.split(",") if v.strip()], default=None,
        help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all); the oracle and hindsight always run "
        "(hindsight needs ffa and rolora)",
    )
    parser.add_argument("--target", type=float, default=0.1, help="relative error to reach")
    parser.add_argument("--rows", type=Path, default=None, help="write one JSON line per run here")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the runs already in --rows (by variant and seed) and run only the missing ones",
    )
    parser.add_argument(
        "--also", action="append", default=[], type=extra_variant, metavar="'LABEL:KEY=VALUE,...'",
        help="one more variant (method aslora unless KEY method says otherwise), e.g. 'aslora beta 0.7:selection.beta=0.7'",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    base = load_config(REPO / "configs" / "synthetic.toml")
    if args.resume and not (args.rows and args.rows.exists()):
        parser.error("--resume needs --rows naming an existing file")
    rows: list[dict] = [json.loads(line) for line in args.rows.open()] if args.resume else []
    done = {(r["variant"], r["seed"]) for r in rows}

    def keep(row: dict) -> None:
        rows.append(row)
        if args.rows:  # as each run ends: a stopped benchmark keeps what it measured
            with args.rows.open("a") as f:
                f.write(json.dumps(row) + "\n")

    if args.rows and not args.resume:
        args.rows.write_text("")
    chosen = VARIANTS if args.variants is None else {v: VARIANTS[v] for v in args.variants if v in VARIANTS}
    if args.variants is not None and len(chosen) < len(args.variants):
        parser.error(f"--variants: unknown {sorted(set(args.variants) - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with tempfile.TemporaryDirectory() as out:
        for label, overrides in (chosen | dict(args.also)).items():
            for seed in seeds:
                if (label, seed) not in done:
                    keep(run_one(base.with_overrides({**overrides, "seed": seed, "output_dir": out}), label, args.target))
        for seed in seeds:
            if ("oracle", seed) in done:
                continue
            raw = base.with_overrides({"method": "oracle", "seed": seed, "output_dir": out}).model_dump(mode="json")
            sigma = next(r["sigma"] for r in rows if r["seed"] == seed and r["variant"] not in ("oracle", "hindsight"))
            raw["privacy"] |= {"epsilon": None, "noise_multiplier": sigma}  # the private runs' noise, no budget
            keep(run_one(parse_config(raw), "oracle", args.target))
    for seed in seeds:
        if ("hindsight", seed) not in done and {"ffa", "rolora"} <= {r["variant"] for r in rows if r["seed"] == seed}:
            keep(hindsight(rows, seed))
    shown = [r for r in rows if r["seed"] in seeds]
    Console(width=170).print(table(shown, len(seeds), base.privacy.epsilon, args.target))

if __name__ == "__main__":
    main()
