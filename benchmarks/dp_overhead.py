"""Median DP-SGD step time over the plain-SGD step, on the default model and the same batch.

    python benchmarks/dp_overhead.py [--batch 32] [--steps 20] [--data-dir ../shared/data]

Both paths train the same parameters (LoRA B of every layer and the head) on
the same fixed SST-2 batch; the DP path is Opacus in hooks mode (per-sample
gradients, joint clip, noise). Also times attaching/detaching Opacus, which the
client does once per round.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from data_dir import add_data_dir

from aslora.adapters import LoraView
from aslora.config import load_config
from aslora.privacy import DPSettings, new_accountant, private_training
from aslora.tasks import load_task

REPO = Path(__file__).resolve().parents[1]


def time_steps(task, view, params, data, batch, dp: DPSettings, steps: int, optimizer: str) -> list[float]:
    """Seconds per optimiser step (forward, backward, clip/noise if DP, update)."""
    times = []
    generator = torch.Generator().manual_seed(0)
    with private_training(view.model, params, data, len(batch[-1]) / len(data), optimizer, 1e-3, dp, new_accountant("rdp"), generator) as s:
        s.module.train()
        for i in range(steps + 3):
            start = time.perf_counter()
            s.optimizer.zero_grad(set_to_none=True)
            task.loss(s.module, batch).backward()
            s.optimizer.step()
            if i >= 3:  # warm-up steps are not counted
                times.append(time.perf_counter() - start)
    return times


def time_attach(view, params, data, dp: DPSettings, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with private_training(view.model, params, data, 32 / len(data), "sgd", 1e-3, dp, new_accountant("rdp"), torch.Generator()):
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    add_data_dir(parser)
    args = parser.parse_args()

    config = load_config(REPO / "configs" / "demo.toml").with_overrides(
        {"data.dir": args.data_dir, "data.train_subset": 4 * args.batch, "data.eval_subset": 8}
    )
    task = load_task(config)
    view = LoraView(task.build_model(config))
    params = view.set_trainable({layer: ("B",) for layer in view.layers}, train_head=True)
    data = task.encode(task.train)
    batch = data[: args.batch]
    tokens = int(batch[1].sum(dim=1).max())
    dp = DPSettings(enabled=True, noise_multiplier=1.0, clip=1.0)
    plain = DPSettings(enabled=False, noise_multiplier=0.0, clip=1.0)
    # Interleave the two paths so that machine noise hits both alike.
    dp_times, plain_times = [], []
    for _ in range(2):
        plain_times += time_steps(task, view, params, data, batch, plain, args.steps // 2, config.optim.optimizer)
        dp_times += time_steps(task, view, params, data, batch, dp, args.steps // 2, config.optim.optimizer)
    dp_med, plain_med = statistics.median(dp_times), statistics.median(plain_times)
    print(f"model: {config.model.name}, batch {args.batch} x {tokens} tokens, {sum(p.numel() for p in params)} trained parameters, "
          f"{torch.get_num_threads()} threads, optimizer {config.optim.optimizer}")
    print(f"non-DP step median: {plain_med * 1e3:.1f} ms over {len(plain_times)} steps")
    print(f"DP step median:     {dp_med * 1e3:.1f} ms over {len(dp_times)} steps (Opacus hooks)")
    print(f"DP / non-DP:        {dp_med / plain_med:.3f}x")
    print(f"attach + detach Opacus per client round: {time_attach(view, params, data, dp) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
