"""How far each LoRA factor moved, against how far the DP noise alone would have carried it.

    python benchmarks/factor_norms.py RUN_DIR [RUN_DIR ...] [--layers] [--data-dir ../shared/data]

A factor trained in n rounds receives, each round, the weighted mean of the clients' DP-SGD
noise: from client i, lr_f sigma C / b_i per coordinate (b_i its expected Poisson batch), with
weight w_i (the method's: n_i / N for most, 1 / K for the authors' rule). With every client in
every round, that is lr_f sigma C sqrt(sum_i w_i^2 / b_i^2) per coordinate and round,
independent across rounds: a random walk of that times sqrt(n d) over a factor of d entries.
Where a factor's final norm (the run's last checkpoint) is sqrt(|start|^2 + walk^2), its exact
start rebuilt from the run's seed, the rounds that trained it left no signal measurable in its
length. The shards, b_i and w_i are rebuilt from the run's config, as the run built them. Read
only: methods that average the clients' factors, SGD at a constant lr, one local step a round.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from data_dir import add_data_dir
from rich.console import Console
from rich.table import Table

from aslora.checkpoint import load_checkpoint
from aslora.config import ExperimentConfig, parse_config
from aslora.experiment import method_context, prepare

# The methods whose global factors are the weighted mean of the clients' (the others re-factorise,
# restart or keep them per client, so the walk above does not describe them).
AVERAGED = ("aslora", "fedavg", "ffa", "rolora", "head")


def noise_per_round(lr: float, sigma: float, clip: float, batches: list[float], weights: list[float]) -> float:
    """The standard deviation per coordinate of one round's aggregated DP noise (module docstring)."""
    total = sum(weights)
    return lr * sigma * clip * math.sqrt(sum((w / total / b) ** 2 for w, b in zip(weights, batches, strict=True)))


def readable(config: ExperimentConfig, run: Path) -> None:
    """Refuse a run whose per-round noise the closed form above does not describe."""
    problems = [
        text for bad, text in (
            (config.federation.clients_per_round != config.data.num_clients, "not every client takes part in every round"),
            (config.federation.local_steps != 1, "federation.local_steps is not 1"),
            (config.optim.lr_schedule != "constant" or config.optim.step_control != "none", "the lr changes between steps"),
            (config.optim.a_lr_rule != "fixed", "optim.a_lr_rule sets A's lr per round"),
            (config.optim.optimizer != "sgd", "the optimizer is not SGD"),
            (config.method not in AVERAGED, f"{config.method} does not keep the weighted mean of the clients' factors"),
        ) if bad
    ]
    if problems:
        raise SystemExit(f"{run}: {'; '.join(problems)}: the noise-alone norm is derived for SGD, all clients, "
                         "one local step at a constant lr (see this script's docstring)")


def trained_rounds(run: Path) -> dict[str, dict[str, int]]:
    """Per layer, the rounds in which each factor was trained (from metrics.jsonl's masks)."""
    counts: dict[str, dict[str, int]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        for layer, factors in json.loads(line)["mask"].items():
            for factor in ("A", "B"):
                counts.setdefault(layer, {"A": 0, "B": 0})[factor] += factor in factors
    return counts


@dataclass(frozen=True)
class FactorNorm:
    layer: str
    factor: str
    rounds: int  # the rounds that trained it
    measured: float  # its norm at the last checkpoint
    expected: float  # its start and the noise's walk alone

    @property
    def ratio(self) -> float:
        return self.measured / self.expected if self.expected else math.nan  # never trained, started at 0


def factor_norms(run: Path, data_dir: str | None = None) -> list[FactorNorm]:
    """Every adapted layer's two factors at the run's last checkpoint, against the noise alone."""
    checkpoint = load_checkpoint(run)
    if checkpoint is None or checkpoint.config is None or checkpoint.privacy is None:
        raise SystemExit(f"{run} holds no checkpoint with its config and privacy plan; pass a run folder (runs/.../<run id>)")
    config = parse_config(checkpoint.config)
    readable(config, run)
    if len(checkpoint.privacy["segments"]) > 1:
        raise SystemExit(f"{run} changed sigma between rounds (an extended run): the walk above assumes one sigma")
    setup = prepare(config.with_overrides({"data.dir": data_dir}) if data_dir else config)
    method, context = setup.method(), method_context(config, setup.privacy)
    batches = [setup.local.expected_batch(n) for n in setup.sizes]
    weights = [float(method.weight(n)) for n in setup.sizes]
    sigma = checkpoint.privacy["segments"][-1][1]
    rounds = trained_rounds(run)
    norms = []
    for layer, factors in checkpoint.state.factors.items():
        for factor in ("A", "B"):
            tensor, start = factors[factor], setup.initial.factors[layer][factor]
            walk = noise_per_round(context.eta_of(factor, factors), sigma, config.privacy.clip, batches, weights) * math.sqrt(tensor.numel() * rounds[layer][factor])
            expected = math.hypot(float(start.float().norm()), walk)
            norms.append(FactorNorm(layer, factor, rounds[layer][factor], float(tensor.float().norm()), expected))
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/.../<run id>) or folders holding one")
    parser.add_argument("--layers", action="store_true", help="a row per layer (default: per factor, over the layers)")
    add_data_dir(parser)
    args = parser.parse_args()
    table = Table(title="LoRA factors at the last checkpoint against their start and the DP noise's random walk alone")
    for column in ("run", "layer" if args.layers else "layers", "factor", "rounds trained", "norm", "start + noise alone", "ratio"):
        table.add_column(column)
    for given in args.runs:
        for run in sorted(p.parent for p in given.glob("*/checkpoint.json")) or [given]:
            norms = factor_norms(run, args.data_dir)
            name = f"{run.parent.name}/{run.name}"
            for factor in ("A", "B"):
                mine = [n for n in norms if n.factor == factor]
                groups = [[n] for n in mine] if args.layers else [mine]
                for group in groups:
                    label = group[0].layer.split("encoder.layer.")[-1] if args.layers else str(len(group))
                    table.add_row(name, label, factor, _span([n.rounds for n in group], "{:d}"),
                                  _span([n.measured for n in group]), _span([n.expected for n in group]),
                                  _span([n.ratio for n in group]))
    Console(width=170).print(table)


def _span(values: list, form: str = "{:.2f}") -> str:
    """min-max over the layers ('-' where the ratio has no meaning: never trained and started at 0)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return form.format(low) if low == high else f"{form.format(low)}-{form.format(high)}"


if __name__ == "__main__":
    main()
