"""A private federation of linear heads on frozen MiniLM features of sentence pairs: how much of a
pair task DP-SGD at epsilon 3 can read from what the encoder already gives, before any LoRA.

    python benchmarks/dp_head_probe.py --task QNLI [--cache /tmp/qnli-uv.npz] [--data-dir ../shared/data]

The pairs of glue/train_subsets/<TASK>/train.json are split over 6 clients by the project's
Dirichlet 0.5 partition (flwr-datasets); each client trains a linear head over the bi-encoder
features [u, v, |u - v|, u * v] (model.pair_encoding 'separate') with the project's DP-SGD
(aslora.privacy.private_training: Opacus, Poisson sampling at one rate for every client, as
optim.batch_scaling 'by_size'), and the server averages the heads by shard size. With the encoder
frozen, every method of the comparison is this one. Scored on the 1,000 pairs of dev.json beside
train.json (held out from the official training set; never the official dev set). Prints, per
point of a small grid, the final and the best accuracy over rounds (the best is optimistic) and
the epsilon each client spent.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from data_dir import add_data_dir
from feature_probe import bi_encoder, embed, read
from transformers import AutoTokenizer

from aslora.config import DataConfig
from aslora.partition import partition
from aslora.pretrained import load_pretrained, resolve_model
from aslora.privacy import (
    DPSettings,
    calibrate_noise,
    new_accountant,
    private_training,
    spent_epsilon,
)
from aslora.tasks.pooling import pooled_classifier

CLIENTS, DELTA = 6, 1e-5
# (expected batch over the mean shard, rounds, local steps, lr, clip, unit-length u and v)
GRID = [
    (batch, rounds, steps, lr, clip, unit)
    for batch, (rounds, steps), lr, clip, unit in itertools.product(
        (256, 750), ((30, 1), (10, 3)), (0.5, 2.0, 8.0), (1.0,), (True, False)
    )
]


def embeddings(task: str, data_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """u and v of every training and held-out pair (computed once, then read from `cache`)."""
    if cache.is_file():
        return dict(np.load(cache))
    folder = data_dir / "glue" / "train_subsets" / task
    train, held = read(folder / "train.json"), read(folder / "dev.json")
    labels = sorted(set(train[2]))
    path = resolve_model("minilm")
    model = pooled_classifier(path, "mean", len(labels)).eval()
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path)
    started = time.perf_counter()
    arrays = {
        "u_train": embed(model, tokenizer, train[0]), "v_train": embed(model, tokenizer, train[1]),
        "u_held": embed(model, tokenizer, held[0]), "v_held": embed(model, tokenizer, held[1]),
        "y_train": np.array([labels.index(x) for x in train[2]]), "y_held": np.array([labels.index(x) for x in held[2]]),
    }
    print(f"embedding: {time.perf_counter() - started:.0f} s", flush=True)
    np.savez(cache, **arrays)
    return arrays


def federate(
    shards: list[torch.utils.data.TensorDataset], held: tuple[torch.Tensor, torch.Tensor], classes: int,
    batch: int, rounds: int, steps: int, lr: float, clip: float, seed: int,
) -> tuple[list[float], float]:
    """Accuracy on `held` after every round, and the largest epsilon a client spent."""
    dim = held[0].shape[1]
    rate = min(1.0, batch * len(shards) / sum(len(s) for s in shards))
    sigma = calibrate_noise(3.0, DELTA, rate, rounds * steps, "rdp")
    dp = DPSettings(enabled=True, noise_multiplier=sigma, clip=clip)
    generator = torch.Generator().manual_seed(seed)
    accountants = [new_accountant("rdp") for _ in shards]
    weights = torch.tensor([len(s) for s in shards], dtype=torch.float64)
    weights /= weights.sum()
    global_head = torch.nn.Linear(dim, classes)
    torch.nn.init.zeros_(global_head.weight), torch.nn.init.zeros_(global_head.bias)  # head_init 'zero'
    curve = []
    for _ in range(rounds):
        states = []
        for shard, accountant in zip(shards, accountants, strict=True):
            head = torch.nn.Linear(dim, classes)
            head.load_state_dict(global_head.state_dict())
            params = list(head.parameters())
            with private_training(head, params, shard, rate, "sgd", lr, dp, accountant, generator) as session:
                batches = iter(session.loader)
                for _ in range(steps):
                    x, y = next(batches, None) or next(iter(session.loader))
                    session.optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(session.module(x), y).backward()
                    session.step()
            states.append(head.state_dict())
        global_head.load_state_dict({k: sum(w * s[k] for w, s in zip(weights.float(), states)) for k in states[0]})
        with torch.no_grad():
            curve.append((global_head(held[0]).argmax(1) == held[1]).float().mean().item())
    return curve, max(spent_epsilon(a, DELTA) for a in accountants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="QNLI", choices=["QNLI", "MNLI"])
    parser.add_argument("--cache", type=Path, help="npz of the embeddings (default /tmp/<task>-uv.npz)")
    parser.add_argument("--seed", type=int, default=0)
    add_data_dir(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    arrays = embeddings(args.task, Path(args.data_dir), args.cache or Path(f"/tmp/{args.task.lower()}-uv.npz"))
    y_train, y_held = arrays["y_train"], arrays["y_held"]
    classes = int(y_train.max()) + 1
    table = datasets.Dataset.from_dict({"label": y_train, "row": np.arange(len(y_train))})
    shards = partition(table, DataConfig(num_clients=CLIENTS, dirichlet_alpha=0.5), args.seed, min_size=32)
    print(f"{args.task}: {len(y_train)} training pairs over shards of {sorted(len(s) for s in shards)}, "
          f"{len(y_held)} held out; majority class {np.bincount(y_held).max() / len(y_held):.3f}", flush=True)
    print("| batch | rounds x steps | lr | clip | u, v | final | best (optimistic) | epsilon |")
    print("|---|---|---|---|---|---|---|---|")
    labels, held_labels = torch.tensor(y_train), torch.tensor(y_held)
    data = {}  # per feature kind: the clients' datasets and the held-out features, built once
    for unit in (True, False):
        x_train = torch.tensor(bi_encoder(arrays["u_train"], arrays["v_train"], unit), dtype=torch.float32)
        x_held = torch.tensor(bi_encoder(arrays["u_held"], arrays["v_held"], unit), dtype=torch.float32)
        data[unit] = [torch.utils.data.TensorDataset(x_train[s["row"]], labels[s["row"]]) for s in shards], x_held
    for batch, rounds, steps, lr, clip, unit in GRID:
        client_data, x_held = data[unit]
        curve, epsilon = federate(client_data, (x_held, held_labels), classes, batch, rounds, steps, lr, clip, args.seed)
        print(f"| {batch} | {rounds} x {steps} | {lr:g} | {clip:g} | {'unit' if unit else 'raw'} | "
              f"{curve[-1]:.3f} | {max(curve):.3f} | {epsilon:.3f} |", flush=True)


if __name__ == "__main__":
    main()
