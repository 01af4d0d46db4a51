"""How long a run spends loading its data before training: GLUE's checked, normalised splits and
the tokenised training set, per task, from the local files.

    python benchmarks/load_time.py [--tasks sst2,qnli,mnli] [--repeats 3] [--data-dir DIR]

Prints the median of `--repeats` loads (the first read of a TSV also builds the Datasets cache,
so it is timed apart as `first`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from data_dir import add_data_dir
from rich.console import Console
from rich.table import Table

from aslora.config import load_config
from aslora.tasks import load_task
from aslora.tasks.glue import load_splits

REPO = Path(__file__).resolve().parents[1]


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,qnli,mnli")
    parser.add_argument("--repeats", type=int, default=3)
    add_data_dir(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = Table(title=f"data loading, median of {args.repeats} ({torch.get_num_threads()} thread)")
    for column in ("task", "train rows", "first s", "splits s", "tokenised train s"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in args.tasks.split(","):
        config = load_config(REPO / "tests" / "base.toml").with_overrides({"data.task": task, "data.dir": args.data_dir})
        first = timed(lambda: load_splits(config, task))  # noqa: B023 - called at once
        splits = statistics.median(timed(lambda: load_splits(config, task)) for _ in range(args.repeats))  # noqa: B023
        loaded = load_task(config)
        encode = statistics.median(timed(lambda: loaded.encode(loaded.train)) for _ in range(args.repeats))  # noqa: B023
        table.add_row(task, f"{len(loaded.train):,}", f"{first:.2f}", f"{splits:.2f}", f"{encode:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
