"""Runs killed with SIGKILL at random moments, resumed until done, against an uninterrupted run:
how many end with the same adapter (difference exactly 0), the same epsilons and every round.

    python benchmarks/kill_resume.py [--runs 4] [--method aslora] [--seed 0]

Each run is configs/synthetic.toml (8 rounds) started as a process and killed at a random time,
resumed with `aslora run --resume` and killed again, until a resume finishes; kills land anywhere,
checkpoint writes included. The reference runs once, uninterrupted, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from aslora.config import load_config
from aslora.experiment import run_experiment

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "aslora", "run"]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _epsilons(run: Path) -> list[float]:
    return [json.loads(line)["epsilon"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--method", default="aslora")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    config_path = REPO / "configs" / "synthetic.toml"
    table = Table(title=f"SIGKILL at random moments, resumed until done ({args.method}, configs/synthetic.toml)")
    for column in ("run", "kills", "rounds", "max |adapter difference|", "epsilons equal", "s"):
        table.add_column(column)
    whole = 0
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        config = load_config(config_path).for_method(args.method, {"output_dir": f"{tmp}/reference", "federation.rounds": 8})
        reference = run_experiment(config)
        window = 1.5 * (time.perf_counter() - started) + 5  # the process's own start-up included
        for i in range(args.runs):
            out = Path(tmp) / f"killed{i}"
            begun = time.perf_counter()
            kills = 0
            command = [*COMMAND, str(config_path), "--method", args.method, "--rounds", "8", "--output-dir", str(out)]
            while True:
                process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    process.wait(timeout=rng.uniform(0.5, window))
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
                    kills += 1
                    runs = list(out.glob("*")) if out.is_dir() else []
                    if runs and (runs[0] / "config.json").is_file():  # a run to resume
                        command = [*COMMAND, "--resume", str(runs[0])]
                    elif runs:  # killed before its config was written: nothing to resume, start again
                        shutil.rmtree(runs[0])
                    continue
                if process.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} exited {process.returncode}")
                break
            (run,) = out.glob("*")
            final, expected = _adapter(run), _adapter(reference.directory)
            difference = max(float((final[k] - expected[k]).abs().max()) for k in expected)
            same = final.keys() == expected.keys() and difference == 0 and _epsilons(run) == _epsilons(reference.directory)
            whole += same
            table.add_row(str(i), str(kills), str(len(_epsilons(run))), f"{difference:.3g}",
                          str(_epsilons(run) == _epsilons(reference.directory)), f"{time.perf_counter() - begun:.0f}")
    console = Console(width=140)
    console.print(table)
    console.print(f"{whole} of {args.runs} killed runs resumed to the uninterrupted run's adapter and epsilons exactly")


if __name__ == "__main__":
    main()
