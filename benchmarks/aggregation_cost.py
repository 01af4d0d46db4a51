"""Server aggregation time per round of every method at real attention-projection shapes.

    python benchmarks/aggregation_cost.py [--repeats 3] [--shapes roberta-base,roberta-large,llama-7b]

For each model shape (LoRA on query and value of every block), rank and number
of clients, times each method's `aggregate` on random client factors (median
of repeats, one adapted matrix, scaled to the model's adapted matrices) and
prints the ratio to `aslora`. Also prints the bytes each client uploads and
downloads per round, from the serialised payloads of one layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from aslora.config import SelectionConfig
from aslora.methods import GlobalState, MethodContext, get_method
from aslora.methods.base import ClientUpdate
from aslora.server import payload_bytes

# model -> (d = k of an attention projection, adapted matrices: 2 per block)
SHAPES = {"roberta-base": (768, 24), "roberta-large": (1024, 48), "llama-7b": (4096, 64)}
METHODS = ("fedavg", "ffa", "rolora", "fedsa", "fedex", "flora", "fedsvd", "flexlora", "aslora")


def _setup(method: str, dim: int, rank: int, clients: int) -> tuple:
    gen = torch.Generator().manual_seed(0)
    context = MethodContext(selection=SelectionConfig(score="random"), eta=0.1, tau=1, nu=0.0, seed=0, rounds=10)
    impl = get_method(method, context)
    state = GlobalState(
        factors={"w": {"A": torch.randn(rank, dim, generator=gen) / dim**0.5, "B": torch.randn(dim, rank, generator=gen)}},
        head={},
        scaling={"w": 2.0},
    )
    mask = impl.plan(1, state)  # round 1: AS-LoRA's random rule and RoLoRA pick one factor
    updates = [
        ClientUpdate(i, 100, {"w": {f: state.factors["w"][f] + 0.01 * torch.randn_like(state.factors["w"][f]) for f in mask["w"]}}, {}, 0.0, 0)
        for i in range(clients)
    ]
    return impl, state, updates, [1.0 / clients] * clients


def time_aggregation(method: str, dim: int, rank: int, clients: int, repeats: int) -> tuple[float, int, int]:
    """Median seconds of one matrix's aggregation; bytes up and down per client for that matrix."""
    impl, state, updates, weights = _setup(method, dim, rank, clients)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        new = impl.aggregate(state, updates, weights)
        times.append(time.perf_counter() - start)
    up = payload_bytes({f"w.{f}": t for f, t in updates[0].factors["w"].items()})
    old = state.tensors()
    down = payload_bytes({k: t for k, t in new.tensors().items() if k not in old or not torch.equal(t, old[k])})
    return statistics.median(times), up, down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--clients", default="10,100")
    args = parser.parse_args()
    console = Console(width=160)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times per round = one matrix x adapted matrices")
    for shape in args.shapes.split(","):
        dim, matrices = SHAPES[shape]
        table = Table(title=f"{shape}: {matrices} adapted {dim}x{dim} matrices (query, value)")
        for column in ("r", "clients", *METHODS):
            table.add_column(column, justify="right")
        sizes = Table(title=f"{shape}: bytes per client per round, up / down (all {matrices} matrices)")
        for column in ("r", *METHODS):
            sizes.add_column(column, justify="right")
        for rank in map(int, args.ranks.split(",")):
            byte_cells = []
            for clients in map(int, args.clients.split(",")):
                results = {m: time_aggregation(m, dim, rank, clients, args.repeats) for m in METHODS}
                base = results["aslora"][0]
                table.add_row(
                    str(rank), str(clients),
                    *(f"{results[m][0] * matrices * 1e3:.1f} ms ({results[m][0] / base:.0f}x)" for m in METHODS),
                )
                byte_cells = [f"{_mib(results[m][1] * matrices)} / {_mib(results[m][2] * matrices)}" for m in METHODS]
            sizes.add_row(str(rank), *byte_cells)
        console.print(table)
        console.print(sizes)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


if __name__ == "__main__":
    main()
