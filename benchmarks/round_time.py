"""Where a round's time goes: the server's own work against the clients' training, per method.

    python benchmarks/round_time.py [--config configs/demo.toml] [--rounds 3] [--data-dir ../shared/data]

Every method runs the same config (default: the demo, all-MiniLM-L6-v2 on
SST-2 under DP) for a few rounds in one process, one after the other, so the
figures are side by side on one machine. For each, per round: the server's
time (plan, which is AS-LoRA's scoring, update checks and aggregation; the
simulator's own measurements of bytes and aggregation error left out), the
sum of the sampled clients' local training times, their ratio, the
aggregation alone, and the bytes a client sends and receives. Every method
holds out 10 % of each shard (FedSA needs it) and evaluates on 200 dev
examples, which is not timed.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from data_dir import add_data_dir
from rich.console import Console
from rich.table import Table

from aslora.config import load_config
from aslora.experiment import run_experiment
from aslora.methods import NAMES as METHODS

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    add_data_dir(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = load_config(args.config)
    table = Table(title=f"{base.name}: per round, mean of {args.rounds} rounds ({torch.get_num_threads()} threads)")
    for column in ("method", "server", "clients (sum)", "server / clients", "aggregation", "up / client", "down / client"):
        table.add_column(column, justify="left" if column == "method" else "right")
    with tempfile.TemporaryDirectory() as out:
        for method in args.methods.split(","):
            config = base.with_overrides(
                {
                    "method": method,
                    "federation.rounds": args.rounds,
                    "output_dir": out,
                    "data.dir": args.data_dir,
                    "data.holdout_fraction": 0.1,  # FedSA evaluates on it; the same shards for every method
                    "data.eval_subset": 200,  # evaluation is not what is timed
                }
            )
            records = run_experiment(config).records
            server = np.mean([r.server_time_s for r in records])
            clients = np.mean([r.client_time_s for r in records])
            table.add_row(
                method,
                f"{server * 1e3:.1f} ms",
                f"{clients:.2f} s",
                f"{server / clients:.2%}",
                f"{np.mean([r.agg_time_s for r in records]) * 1e3:.2f} ms",
                f"{np.mean([r.bytes_up_per_client for r in records]) / 1024:.0f} KiB",
                f"{np.mean([r.bytes_down_per_client for r in records]) / 1024:.0f} KiB",
            )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
