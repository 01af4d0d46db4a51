"""Why DP-SGD learns nothing at CPU scale: the clipped gradient's signal against the DP noise.

    python benchmarks/dp_signal.py [--configs configs/paper/sst2.toml,...] [--epsilons 1,3,6]
                                   [--examples 256] [--data-dir ../shared/data]

At the start of training (the state every method starts from): the per-example gradients
of what round one trains (LoRA B of every adapted layer and the head, unless
lora.train_head is false; the same for A with B perturbed), clipped to the config's
clip, on `--examples` examples of client 0's (its non-IID shard) and on as many drawn
from the whole training set with every label equally often (the global objective without
label skew, which every method must learn past). Their mean's norm s is the signal one
DP-SGD step follows; the coherence |mean g_i/|g_i|| says how much of the gradients
agree. Against the global signal: the noise a step adds, sigma C sqrt(d) / b, with sigma
calibrated as the run calibrates it for each epsilon, and the steps T it takes for the
accumulated signal to reach the accumulated noise, (sigma C sqrt(d) / (s b))^2, assuming
the signal kept its direction (an optimistic bound).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import datasets
import torch
from data_dir import add_data_dir
from datasets import concatenate_datasets
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

from aslora.config import load_config
from aslora.experiment import Setup, prepare
from aslora.privacy import DPSettings, new_accountant, private_training

REPO = Path(__file__).resolve().parents[1]
PAPER = ",".join(str(REPO / "configs" / "paper" / f"{t}.toml") for t in ("sst2", "qnli", "mnli"))


def per_example_gradients(setup: Setup, factor: str, split: datasets.Dataset) -> tuple[torch.Tensor, int]:
    """Per-example gradients of `factor` (every layer) and, where the config trains it, the head on
    `split`, as DP-SGD sees them."""
    view, task = setup.view, setup.task
    mask = {layer: (factor,) for layer in view.layers}
    params = view.set_trainable(mask, train_head=setup.config.lora.train_head)
    if factor == "A":  # at B = 0 the gradient of A is zero; perturb B as after a round
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in view.layers:
                b = view.parameter(layer, "B")
                b.copy_(0.01 * torch.randn(b.shape, generator=generator))
    per_example = torch.cat(grad_samples(setup, params, task.encode_train(split)), dim=1)
    return per_example, sum(p.numel() for p in params)


def grad_samples(setup: Setup, params: list[torch.nn.Parameter], data: TensorDataset) -> list[torch.Tensor]:
    """Each of `params`' per-example gradients on `data` (flattened), as DP-SGD's clip sees them:
    Opacus's per-sample gradients of one pass, nothing clipped or noised yet."""
    dp = DPSettings(True, 0.0, setup.config.privacy.clip)
    with private_training(setup.view.model, params, data, len(data), "sgd", 0.0, dp, new_accountant("rdp"), torch.Generator()) as s:
        s.module.train()
        setup.task.loss(s.module, data[:]).backward()
        return [p.grad_sample.flatten(1) for p in params]


def balanced(split: datasets.Dataset, n: int) -> datasets.Dataset:
    """n examples, as many of each label: what is left of the signal once label skew is gone."""
    split = split.shuffle(seed=0)
    labels = sorted(set(split["label"]))
    return concatenate_datasets(
        [split.filter(lambda row, y=y: row["label"] == y).select(range(n // len(labels))) for y in labels]
    )


def signal(grads: torch.Tensor, clip: float) -> tuple[float, float, float]:
    """(median |g_i|, coherence, |mean of the clipped g_i|)."""
    norms = grads.norm(dim=1)
    clipped = grads * (clip / norms.clamp(min=clip))[:, None]
    return float(norms.median()), float((grads / norms[:, None]).mean(0).norm()), float(clipped.mean(0).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=PAPER)
    parser.add_argument("--epsilons", default="1,3,6")
    parser.add_argument("--examples", type=int, default=256)
    add_data_dir(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    epsilons = [float(e) for e in args.epsilons.split(",")]

    table = Table(title=f"DP signal at the start of training, {args.examples} examples")
    columns = ("config", "trained", "d", "b", "|g_i| median", "coherence: client 0 / global", "global signal s")
    for column in (*columns, *(f"eps {e:g}: sigma, T" for e in epsilons)):
        table.add_column(column, justify="left" if column in ("config", "trained") else "right")
    for path in args.configs.split(","):
        loaded = load_config(path)
        base = loaded.for_method(loaded.method).with_overrides({"data.dir": args.data_dir})
        sigmas = [prepare(base.with_overrides({"privacy.epsilon": e})).privacy.noise_multiplier for e in epsilons]
        for factor in ("B", "A"):
            setup = prepare(base)
            n = min(args.examples, len(setup.shards[0]), min(map(len, setup.shards)) * len(setup.shards))
            local, d = per_example_gradients(setup, factor, setup.shards[0].select(range(n)))
            setup = prepare(base)  # the same start again: the first pass trained nothing, but be exact
            pooled = balanced(concatenate_datasets(setup.shards), n)
            overall, _ = per_example_gradients(setup, factor, pooled)
            clip, b = base.privacy.clip, base.optim.batch_size
            median, coherence, s = signal(overall, clip)
            cells = [f"{sigma:.2f}, {(sigma * clip * math.sqrt(d) / (s * b)) ** 2:,.0f}" for sigma in sigmas]
            trained = f"{factor} + head" if base.lora.train_head else f"{factor}, head frozen"
            table.add_row(
                Path(path).stem, trained, f"{d:,}", str(b), f"{median:.3f}",
                f"{signal(local, clip)[1]:.3f} / {coherence:.3f}", f"{s:.4f}", *cells,
            )
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
