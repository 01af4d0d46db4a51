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
from aslora.methods import NAMES as METHODS
from aslora.methods import MethodContext, get_method
from aslora.protocol import ClientUpdate, GlobalState, pack

# model -> (d = k of an attention projection, adapted matrices: 2 per block)
SHAPES = {"roberta-base": (768, 24), "roberta-large": (1024, 48), "llama-7b": (4096, 64)}


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
    up = len(pack(impl.uploaded(updates[0])))  # tensors as they travel, without the job's header
    old = impl.downloaded(state)
    down = len(pack({k: t for k, t in impl.downloaded(new).items() if k not in old or not torch.equal(t, old[k])}))
    return statistics.median(times), up, down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--clients", default="10,100")
    args = parser.parse_args()
    console = Console(width=160)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; per round = one matrix x adapted matrices")
    settings = [(int(r), int(n)) for r in args.ranks.split(",") for n in args.clients.split(",")]
    for shape in args.shapes.split(","):
        dim, matrices = SHAPES[shape]
        results = {(r, n): {m: time_aggregation(m, dim, r, n, args.repeats) for m in METHODS} for r, n in settings}
        table = Table(title=f"{shape}: server aggregation per round, {matrices} adapted {dim}x{dim} matrices (ratio to aslora)")
        table.add_column("method")
        for r, n in settings:
            table.add_column(f"r={r}, {n} clients", justify="right")
        for m in METHODS:
            cells = []
            for key in settings:
                seconds, base = results[key][m][0], results[key]["aslora"][0]
                cells.append(f"{seconds * matrices * 1e3:.1f} ms ({seconds / base:.0f}x)")
            table.add_row(m, *cells)
        console.print(table)
        sizes = Table(title=f"{shape}: bytes per client per round, all {matrices} matrices")
        sizes.add_column("method")
        ranks = sorted({r for r, _ in settings})
        for r in ranks:
            sizes.add_column(f"r={r} up", justify="right")
            sizes.add_column(f"r={r} down", justify="right")
        for m in METHODS:
            cells = []
            for r in ranks:
                key = next(k for k in settings if k[0] == r)
                cells += [_mib(results[key][m][1] * matrices), _mib(results[key][m][2] * matrices)]
            sizes.add_row(m, *cells)
        console.print(sizes)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


if __name__ == "__main__":
    main()
