"""The paper's comparison: every method and AS-LoRA variant, per task and epsilon, over seeds that
share their partitions; final accuracy with a 95 % interval, the authors' best-over-rounds figure,
rounds to a target, the epsilon spent, and AS-LoRA paired against each baseline.

    python benchmarks/paper_table.py run   [--suite cpu] [--tasks sst2,qnli,mnli] [--epsilons 3]
                                           [--seeds 3 | --seed S ...] [--variants ...] [--data-dir ../shared/data]
    python benchmarks/paper_table.py table [--suite cpu]

Suites (configs under configs/paper/):
- `cpu`: `<task>.toml`, the DP regime that learns on 2 CPU cores (benchmarks/RESULTS.md);
- `cpu-fixed`: SST-2's regime until 2026-12-07 (midday): `<task>.toml` with every client's expected
  batch fixed at `optim.batch_size` (`optim.batch_scaling = "fixed"`), so that the smallest
  client's sampling rate set every client's sigma (SST-2 only);
- `cpu-b512`: SST-2's regime before 2026-12-07: `cpu-fixed`'s examples in a quarter of the steps
  (expected batch 512, 30 rounds of one local step), the last round's model scored (SST-2 only);
- `cpu-2step`: `cpu-b512` with its 30 DP-SGD steps as 15 rounds x 2 local steps (SST-2 only),
  the regime in which AS-LoRA's secant score can run;
- `cpu-2step-control`: `cpu-2step` with `optim.step_control = "secant"` (a client's second step
  shortened where its first overshot its loss), for every method alike;
- `cpu-2step-decay`: `cpu-2step` with `optim.step_control = "secant_decay"` (also each round
  starting at the lr the last round's steps ended at);
- `cpu-cosine`: `<task>.toml` with `optim.lr_schedule = "cosine"` (each round's lr set by the server,
  falling from lr towards 0 over the rounds);
- `cpu-b128`: `cpu-fixed` with dev scoring each round's own model, not the average over rounds
  (`federation.ema_decay = 0`);
- `cpu-f32`: `<task>.toml` with the frozen encoder in float32 on every machine (`model.dtype =
  "float32"`): `cpu`'s rows take bfloat16 where the CPU has it natively, so this is their control;
- `authors-minilm`: `authors-<task>-minilm.toml`, the authors' protocol with MiniLM, fewer rounds;
- `authors-roberta-large`: `authors-<task>-roberta-large.toml`, their protocol exactly (GPU, hub).

SST-2's rows run up to 2026-12-08, in `cpu` and in every suite derived from `<task>.toml`, ran
sst2.toml's lrs by method (the head at its method's lr); the table now sets them aside as another
regime. Their tables rebuild with the configs of then: `git checkout 283e1be -- configs/paper/sst2.toml`,
`table`, then `git checkout HEAD -- configs/paper/sst2.toml`.

`run` works through the grid in any order and part (tasks, epsilons, seeds, variants) and
may be stopped at any time: a finished run is skipped, an interrupted one resumes from its
checkpoint. Each finished run appends one row to `benchmarks/paper/<suite>.jsonl` (task,
epsilon, variant, seed, final and best metric, epsilon spent, the curve, wall time), and
`table` rebuilds `<suite>.md` and the plots from that file alone, without any run folder.
Seed s gives every variant the same partition, initial adapter and client sampling, so
differences between variants at one seed are paired.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from data_dir import add_data_dir
from scipy import stats
from sound_run import require_sound

from aslora.config import ConfigError, ExperimentConfig, load_config
from aslora.experiment import run_experiment
from aslora.methods import ABLATIONS, NAMES
from aslora.pretrained import resolve_dtype
from aslora.report import plot_comparison, rounds_to_reach

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "paper"
# Equal step sizes: the head at 4, both factors at 2 (RESULTS.md, 2026-12-07 late night: FedAvg's slow
# start was its head's lr). sst2.toml steps every method so since 2026-12-08 (the nineteenth screen); qnli.toml
# and mnli.toml still step FedAvg's factors and head at 2 and the one-factor methods' head and B at 4 (A at 1),
# and these controls give every trained parameter the same lr in the methods they compare.
EQUAL_STEPS = {"optim.lr": 2.0, "optim.a_lr_scale": 1.0, "optim.head_lr_scale": 2.0}
LR_CONTROLS = {
    "fedavg head2x": {"method": "fedavg", "optim.head_lr_scale": 2.0},
    "aslora fedavg-lr": {"method": "aslora"} | EQUAL_STEPS,
    "ffa fedavg-lr": {"method": "ffa"} | EQUAL_STEPS,
}
VARIANTS = {m: {"method": m} for m in NAMES} | ABLATIONS | LR_CONTROLS
BASELINES = [m for m in NAMES if m != "aslora"]
SUITES = {
    "cpu": "{task}.toml",
    "cpu-fixed": "{task}.toml",
    "cpu-b512": "{task}.toml",
    "cpu-2step": "{task}.toml",
    "cpu-2step-control": "{task}.toml",
    "cpu-2step-decay": "{task}.toml",
    "cpu-cosine": "{task}.toml",
    "cpu-b128": "{task}.toml",
    "cpu-f32": "{task}.toml",
    "authors-minilm": "authors-{task}-minilm.toml",
    "authors-roberta-large": "authors-{task}-roberta-large.toml",
}
# A suite that is another's config with its DP-SGD steps regrouped or its lr scheduled: derived, so it cannot drift from it.
# cpu-fixed: the cpu grid's SST-2 rows until 2026-12-07 (midday), every client at an expected batch of 128,
# so the smallest shard's sampling rate set sigma for all (the eighteenth screen, sweep/sst2-sampling.toml,
# made 'by_size' sst2.toml's); 'fixed' is the default, so these rows keep their fingerprints.
# cpu-b512: SST-2's regime of the grid rows up to 2026-12-07 (sst2.toml then: expected batch 512, 30 rounds
# of one step, the last iterate scored); its rows keep their fingerprints. cpu-2step: its 30 steps as 15
# rounds x 2, the same sigma and epsilon (AS-LoRA's secant score needs two privatised gradients per round).
# cpu-2step-control: the same with each client's second step shortened where the first overshot
# (optim.step_control 'secant'); cpu-2step-decay: and each round starting at the lr the last one's steps
# ended at ('secant_decay'). cpu-cosine: cpu's rounds with a cosine lr over them (optim.lr_schedule).
# cpu-b128: cpu-fixed without the average over rounds (the seventeenth screen's control: its iterates swing on dev).
# cpu-f32: cpu with a float32 encoder wherever it runs ('auto' takes bfloat16 on CPUs that have it), so that
# cpu's rows run on two kinds of machine can be checked against one numeric precision.
FIXED = {"optim.batch_scaling": "fixed"}
B512 = FIXED | {"optim.batch_size": 512, "federation.rounds": 30, "federation.eval_every": 5, "federation.ema_decay": 0.0}
TWO_STEPS = B512 | {"federation.rounds": 15, "federation.local_steps": 2}
SUITE_OVERRIDES = {
    "cpu-b512": B512,
    "cpu-2step": TWO_STEPS,
    "cpu-2step-control": TWO_STEPS | {"optim.step_control": "secant"},
    "cpu-2step-decay": TWO_STEPS | {"optim.step_control": "secant_decay"},
    "cpu-cosine": {"optim.lr_schedule": "cosine"},
    "cpu-fixed": FIXED,
    "cpu-b128": FIXED | {"federation.ema_decay": 0.0},
    "cpu-f32": {"model.dtype": "float32"},
}
# Rounds to reach this accuracy measure convergence speed (ALGORITHM.md section 6), per task:
# about two thirds of the way from the majority class to the best final accuracy measured.
TARGETS = {"sst2": 0.75, "qnli": 0.65, "mnli": 0.50}
# The AS-LoRA rule a suite pairs against every other variant: the spec's, except where the suite
# was built for another rule (cpu-2step: the secant score, which needs two local steps).
REFERENCE = dict.fromkeys(("cpu-2step", "cpu-2step-control", "cpu-2step-decay"), "aslora secant")


def _slug(text: str) -> str:
    return text.replace(" ", "-")


def task_config(suite: str, task: str, method: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The config `method` runs in a suite: the task's file, the method's per_method table, then the
    suite's overrides (after the table, so that a setting one method cannot take, such as averaging
    the global model for FedSA's personalised models, leaves that method out instead of the file)."""
    config = load_config(REPO / "configs" / "paper" / SUITES[suite].format(task=task))
    return config.for_method(method, {**SUITE_OVERRIDES.get(suite, {}), **(overrides or {})})


def regime(suite: str, task: str, variant: str) -> str:
    """A short fingerprint of the config a variant runs (its method's per_method table applied),
    less what the grid sets per cell: rows of an edited regime must never be averaged with, or
    skip, the rows of the one before. Methods without a per_method table share the task's. Only
    what differs from the defaults counts, so a new config key leaves the fingerprints as they were."""
    resolved = task_config(suite, task, VARIANTS[variant]["method"])
    config = resolved.model_dump(mode="json", exclude_defaults=True)
    for key in ("method", "seed", "output_dir", "name"):
        config.pop(key, None)
    config.get("privacy", {}).pop("epsilon", None)
    config.get("data", {}).pop("dir", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def machine() -> str:
    """The CPU model and core count: timings and bfloat16 rounding (model.dtype auto) depend on it."""
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.is_file() else []
    return f"{names[0].strip() if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def cells(suite: str, tasks: list[str], epsilons: list[float], seeds: list[int], variants: list[str]) -> Iterator[tuple]:
    """Every (task, regime fingerprint, epsilon, variant, seed) of the grid, with its run's folder."""
    for task in tasks:
        fingerprints = {variant: regime(suite, task, variant) for variant in variants}
        for eps in epsilons:
            for seed in seeds:  # seed-major: a partly run grid holds complete seeds first
                for variant in variants:
                    fingerprint = fingerprints[variant]
                    folder = REPO / "runs" / "paper" / suite / f"{task}-{fingerprint}-eps{eps:g}" / f"{_slug(variant)}-s{seed}"
                    yield task, fingerprint, eps, variant, seed, folder


def results_file(suite: str) -> Path:
    return OUT / f"{suite}.jsonl"


def load_rows(suite: str) -> list[dict]:
    path = results_file(suite)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _key(row: dict) -> tuple:
    return row["task"], row.get("regime"), float(row["epsilon"]), row["variant"], int(row["seed"])


def row_of(
    task: str, eps: float, variant: str, seed: int, summary: dict, metric: str, fingerprint: str, encoder_dtype: str
) -> dict:
    """What the table needs from one finished run, as one JSON line; `encoder_dtype` is what
    model.dtype resolved to on this machine ('auto': bfloat16 only where the CPU has it natively)."""
    curve = sorted((int(r), m[metric]) for r, m in summary["metric_by_round"].items() if metric in m)
    values = [v for _, v in curve]
    target = TARGETS.get(task)
    reached = rounds_to_reach(summary, metric, target) if target is not None else None
    return {
        "task": task, "regime": fingerprint, "epsilon": eps, "variant": variant, "seed": seed, "metric": metric,
        "final": summary["final_metrics"][metric], "best": max(values) if values else None,
        "epsilon_spent": summary["epsilon"], "delta": summary["delta"], "sigma": summary["noise_multiplier"],
        "target": target, "rounds_to_target": reached, "rounds": summary["rounds_completed"],
        "curve": curve, "wall_s": round(summary["wall_time_s"], 1), "machine": machine(),
        "encoder_dtype": encoder_dtype,
    }


def run(
    suite: str, tasks: list[str], epsilons: list[float], seeds: list[int], variants: list[str], data_dir: str,
    explicit: bool = True,
) -> None:
    """Every missing cell; a variant the task's regime cannot run is an error before anything trains
    where --variants named it, and is left out with a note where it came from the default list."""
    finished = {_key(r) for r in load_rows(suite)}
    todo = []
    for task, fingerprint, eps, variant, seed, folder in cells(suite, tasks, epsilons, seeds, variants):
        if (task, fingerprint, eps, variant, seed) in finished:
            continue
        try:  # every cell's config is checked before the first one trains
            config = task_config(
                suite, task, VARIANTS[variant]["method"],
                {**VARIANTS[variant], "privacy.epsilon": eps, "seed": seed, "output_dir": str(folder), "data.dir": data_dir},
            )
        except ConfigError as exc:
            if explicit:
                raise ConfigError(f"{task}, variant '{variant}': {exc} (leave it out of --variants)") from None
            print(f"left out: {task} '{variant}', which this regime cannot run: {exc}", flush=True)
            continue
        todo.append((task, fingerprint, eps, variant, seed, folder, config))
    for task, fingerprint, eps, variant, seed, folder, config in todo:
        interrupted = sorted(p.parent for p in folder.glob("*/checkpoint.json") if not (p.parent / "summary.json").exists())
        started = time.perf_counter()
        result = run_experiment(config, resume=interrupted[-1] if interrupted else None)
        require_sound(result.summary, config)
        row = row_of(task, eps, variant, seed, result.summary, "accuracy", fingerprint, resolve_dtype(config.model.dtype))
        results_file(suite).parent.mkdir(parents=True, exist_ok=True)
        with results_file(suite).open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{task} eps={eps:g} {variant} seed {seed}: final {row['final']:.4f}, best {row['best']:.4f}, "
              f"eps spent {row['epsilon_spent']:.3f}, {time.perf_counter() - started:.0f} s", flush=True)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (NaN for one value: no interval)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


def _reference(suite: str, by_variant: dict[str, dict[int, dict]]) -> str | None:
    """The AS-LoRA variant the pairs are taken against: the suite's own, else the first AS-LoRA
    variant the task ran (QNLI's suite ran the secant rule only)."""
    preferred = REFERENCE.get(suite, "aslora")
    if preferred in by_variant:
        return preferred
    return next((v for v in by_variant if v.split()[0] == "aslora"), None)


def _paired(diffs: list[float]) -> str:
    """A mean paired difference and its 95 % t-interval ('-' where it cannot be had)."""
    if any(math.isnan(d) for d in diffs):
        return "- | -"
    mean, half = interval(diffs)
    return f"{mean:+.4f} | " + ("- (one seed)" if math.isnan(half) else f"[{mean - half:+.4f}, {mean + half:+.4f}]")


def _fmt(mean: float, half: float) -> str:
    return f"{mean:.4f}" if math.isnan(half) else f"{mean:.4f} ± {half:.4f}"


def block(task: str, eps: float, rows: list[dict], out: Path, suite: str) -> list[str]:
    """One (task, epsilon): per-variant figures over the seeds every variant finished, then the pairs
    over the seeds each pair finished."""
    by_variant: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    common = sorted(set.intersection(*(set(v) for v in by_variant.values())))
    lines = [f"## {task}, epsilon {eps:g}", ""]
    if not common:
        lines += ["No seed finished by every variant yet.", ""]
    target = rows[0]["target"]
    lines += [] if not common else [
        (f"Seeds {common} (every variant). Final = accuracy after the last round, mean ± 95 % t-interval; "
        "best = the best accuracy over the evaluated rounds (the authors' metric: optimistic, it picks "
        f"the round on dev); rounds to {target}: per seed (- = never)."),
        "",
        "| variant | final | best over rounds (optimistic) | rounds to target | epsilon spent | wall s / run |",
        "|---|---|---|---|---|---|",
    ]
    for variant, runs in by_variant.items() if common else ():
        chosen = [runs[s] for s in common]
        reached = ", ".join("-" if r["rounds_to_target"] is None else str(r["rounds_to_target"]) for r in chosen)
        lines.append(
            f"| {variant} | {_fmt(*interval([r['final'] for r in chosen]))} | "
            f"{_fmt(*interval([r['best'] for r in chosen]))} | {reached} | "
            f"{max(r['epsilon_spent'] for r in chosen):.3f} | {np.mean([r['wall_s'] for r in chosen]):.0f} |"
        )
    reference = _reference(suite, by_variant)
    if reference is not None:
        first = min(r for runs in by_variant.values() for row in runs.values() for r, _ in row["curve"])
        lines += ["", (f"`{reference}` minus each other variant, paired by seed (same partition, start and "
                       "sampling), over the seeds both finished; early = the same after the first evaluated round "
                       f"({first + 1}), where the faster-convergence claim shows:"), "",
                  (f"| against | mean difference (final) | 95 % interval | `{reference}` ahead on | early: mean "
                   "difference | early: 95 % interval |"), "|---|---|---|---|---|---|"]
        for variant, runs in by_variant.items():
            shared = sorted(set(runs) & set(by_variant[reference]))
            if variant == reference or not shared:
                continue
            diffs = [by_variant[reference][s]["final"] - runs[s]["final"] for s in shared]
            early = [dict(by_variant[reference][s]["curve"]).get(first, math.nan) - dict(runs[s]["curve"]).get(first, math.nan)
                     for s in shared]
            wins = sum(d > 0 for d in diffs)
            lines.append(f"| {variant} | {_paired(diffs)} | {wins} of {len(diffs)} seeds ({shared}) | {_paired(early)} |")
    if not common:
        return [*lines, ""]
    curves = {v: [dict(runs[s]["curve"]) for s in common] for v, runs in by_variant.items()}
    plot = plot_comparison({v: [{r: {"accuracy": a} for r, a in c.items()} for c in cs] for v, cs in curves.items()},
                           "accuracy", out / f"{suite}-{task}-eps{eps:g}.png")
    return [*lines, "", f"![{task} epsilon {eps:g}: accuracy per round]({plot.name})", ""]


def _run_times(rows: list[dict]) -> str:
    """The median run time and its 10-90 % range (several runs shared the machine: see each row)."""
    if not rows:
        return "no runs"
    times = [r["wall_s"] for r in rows]
    low, middle, high = np.percentile(times, [10, 50, 90])
    return f"median run {middle:.0f} s, 10-90 % range {low:.0f}-{high:.0f} s"


def _dtypes(rows: list[dict]) -> str:
    """How many rows ran the frozen encoder in each dtype (rows before 2026-12-07: not recorded)."""
    counts = Counter(r.get("encoder_dtype", "not recorded") for r in rows)
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"


def _overridden(suite: str) -> str:
    """What the suite sets over its task files, as the table's header names it."""
    overrides = SUITE_OVERRIDES.get(suite, {})
    return " with " + ", ".join(f"`{k} = {v}`" for k, v in overrides.items()) if overrides else ""


def _carried(rows: list[dict]) -> list[str]:
    """A line naming the rows run under an earlier config as a control whose resolved config is the
    current one's (`carried_from`): the same run, counted under the variant it now is."""
    carried = Counter((r["carried_from"]["variant"], r["variant"], r["carried_from"]["configs_at"]) for r in rows if "carried_from" in r)
    if not carried:
        return []
    return ["Carried: " + "; ".join(
        f"{n} rows of `{was}` run with the configs at {commit}, now `{now}` (the same resolved config)"
        for (was, now, commit), n in sorted(carried.items())) + "."]


def table(suite: str) -> Path:
    """`<suite>.md` and its plots, from `<suite>.jsonl` alone."""
    rows = load_rows(suite)
    pairs = {(r["task"], r["variant"]) for r in rows}
    current = {(task, variant): regime(suite, task, variant) for task, variant in pairs}
    stale = [r for r in rows if r.get("regime") != current[r["task"], r["variant"]]]
    rows = [r for r in rows if r.get("regime") == current[r["task"], r["variant"]]]
    shown = sorted({(task, fingerprint) for (task, _), fingerprint in current.items()})
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], float(r["epsilon"])), []).append(r)
    lines = [
        f"# The paper's comparison, suite `{suite}`",
        "",
        (f"Configs: configs/paper/{SUITES[suite]}{_overridden(suite)}. Rows: {results_file(suite).name} ({len(rows)} runs, "
        f"{sum(r['wall_s'] for r in rows) / 3600:.2f} h of recorded wall time; {_run_times(rows)}). Machine of the last rebuild: "
        f"{machine()}. Machines of the rows: {', '.join(sorted({r.get('machine', '?') for r in rows}))}; the frozen "
        f"encoder's dtype in them: {_dtypes(rows)}."),
        (f"Set aside: {len(stale)} rows of an earlier version of the configs (another regime fingerprint)."
        if stale else "Every row was run with the configs as they stand (regime fingerprints "
        f"{', '.join(f'{t} {h}' for t, h in shown)})."),
        *_carried(rows),
        (f"Commands: `python benchmarks/paper_table.py run --suite {suite} ...`, then "
        f"`python benchmarks/paper_table.py table --suite {suite}`."),
        "",
    ]
    for (task, eps), group in sorted(groups.items()):
        lines += block(task, eps, group, OUT, suite)
    path = OUT / f"{suite}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--suite", choices=list(SUITES), default="cpu")
    parser.add_argument("--tasks", default="sst2,qnli,mnli")
    parser.add_argument("--epsilons", default="3")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seeds", type=int, default=3, help="how many seeds: 0 to N-1")
    which.add_argument(
        "--seed", type=int, action="append", help="this seed only (repeat for more, run in that order): --seed 1 --seed 0"
    )
    parser.add_argument(
        "--variants", default="",
        help="comma-separated; names with spaces allowed (default: every variant the task's regime can run)",
    )
    add_data_dir(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seeds = list(dict.fromkeys(args.seed or range(args.seeds)))  # in the order given, each once
    if not seeds or min(seeds) < 0:
        parser.error("--seeds counts seeds (at least 1) and --seed names one (0 or more)")
    if args.action == "run":
        epsilons = [float(e) for e in args.epsilons.split(",")]
        try:
            run(args.suite, args.tasks.split(","), epsilons, seeds, variants, args.data_dir, bool(args.variants))
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None
    print(table(args.suite))


if __name__ == "__main__":
    main()
