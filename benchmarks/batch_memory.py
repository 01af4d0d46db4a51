"""Peak memory and time per example of DP-SGD as the expected Poisson batch grows, and over rounds.

    python benchmarks/batch_memory.py batches [--batches 128,512,2048] [--micro 128] [--steps 3] [--dtype auto]
    python benchmarks/batch_memory.py rounds  [--config configs/paper/authors-sst2-minilm.toml] [--rounds 6]

`batches`: one client of SST-2 (20,000 training examples) with MiniLM as in
configs/paper/sst2.toml (LoRA on query/value; texts up to 128 tokens), trains `--steps` DP-SGD steps at each expected batch size,
each in a fresh process so that its peak resident memory (ru_maxrss) is its
own; micro-batches of `--micro` (0: the whole batch in one pass).
`rounds`: the given config runs for `--rounds` rounds while a sampler thread
records the process's resident memory; the peak of each round is printed.
Memory must stay flat in both: with micro-batches the peak follows the
micro-batch, not the logical batch, and nothing accumulates across rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from data_dir import add_data_dir

REPO = Path(__file__).resolve().parents[1]


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def one_batch_size(batch: int, micro: int, steps: int, dtype: str, data_dir: str) -> dict[str, float]:
    """Run in a child process: train `steps` DP steps of expected batch `batch`; peak RSS and s/example."""
    import torch

    from aslora.adapters import LoraView
    from aslora.client import LocalSettings, train_client
    from aslora.config import load_config
    from aslora.privacy import DPSettings
    from aslora.protocol import ClientJob, GlobalState
    from aslora.tasks import load_task

    config = load_config(REPO / "configs" / "paper" / "sst2.toml").with_overrides(
        {"data.dir": data_dir, "data.train_subset": 20_000, "model.max_length": 128, "model.dtype": dtype}
    )
    task = load_task(config)
    view = LoraView(task.build_model(config))
    data = task.encode_train(task.train)
    state = GlobalState(view.get_factors(), view.get_head(), {l: view.scaling(l) for l in view.layers})
    settings = LocalSettings(steps, batch, 0.5, "sgd", DPSettings(True, 1.0, 1.0), "rdp", True, micro)
    job = ClientJob(0, 0, 0, {layer: ("B",) for layer in view.layers})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    update = train_client(view, data, state, job, settings, task.loss)
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "batch": batch, "micro": micro, "steps": steps, "examples": update.examples_seen,
        "peak_rss_bytes": peak, "peak_over_model_bytes": peak - before,
        "ms_per_example": 1000 * elapsed / max(1, update.examples_seen), "threads": torch.get_num_threads(),
    }


def batches(sizes: list[int], micro: int, steps: int, dtype: str, data_dir: str) -> None:
    print(f"expected batch -> peak memory, time per example (configs/paper/sst2.toml, max_length 128, "
          f"encoder {dtype}, micro-batch {micro or 'none'}, {steps} steps, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f})")
    for size in sizes:
        child = subprocess.run(
            [sys.executable, __file__, "_child", str(size), str(micro), str(steps), dtype, "--data-dir", data_dir],
            capture_output=True, text=True, check=True,
        )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  batch {size:5d}: peak RSS {_gib(row['peak_rss_bytes'])} ({_gib(row['peak_over_model_bytes'])} "
              f"above the loaded model), {row['ms_per_example']:.2f} ms per example over {row['examples']}")


def rounds(config_path: Path, n_rounds: int, data_dir: str) -> None:
    from aslora.config import load_config
    from aslora.experiment import run_experiment

    out = Path(tempfile.mkdtemp(prefix="batch-memory-"))
    config = load_config(config_path).with_overrides(
        {"data.dir": data_dir, "output_dir": str(out), "federation.rounds": n_rounds, "federation.eval_every": n_rounds}
    )
    process, peaks, stop = psutil.Process(), {}, threading.Event()

    def rounds_done() -> int:
        metrics = list(out.glob("*/metrics.jsonl"))
        return len(metrics[0].read_text().splitlines()) if metrics else 0

    def sample() -> None:  # the peak of round r is attributed while r rounds are written
        while not stop.is_set():
            done = rounds_done()
            peaks[done] = max(peaks.get(done, 0), process.memory_info().rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_experiment(config)
    stop.set()
    sampler.join()
    print(f"{config_path}: resident memory per round ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    for r in sorted(k for k in peaks if k < n_rounds):
        print(f"  round {r + 1}: peak RSS {_gib(peaks[r])}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        batch, micro, steps = (int(x) for x in sys.argv[2:5])
        print(json.dumps(one_batch_size(batch, micro, steps, sys.argv[5], sys.argv[-1])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("batches")
    b.add_argument("--batches", default="128,256,512,1024,2048")
    b.add_argument("--micro", type=int, default=128)
    b.add_argument("--steps", type=int, default=3)
    b.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    add_data_dir(b)
    r = sub.add_parser("rounds")
    r.add_argument("--config", type=Path, default=REPO / "configs" / "paper" / "authors-sst2-minilm.toml")
    r.add_argument("--rounds", type=int, default=6)
    add_data_dir(r)
    args = parser.parse_args()
    if args.command == "batches":
        batches([int(x) for x in args.batches.split(",")], args.micro, args.steps, args.dtype, args.data_dir)
    else:
        rounds(args.config, args.rounds, args.data_dir)


if __name__ == "__main__":
    main()
