"""How tight the server's update norm bound is: the distance one real DP-SGD round moved the
trained factors against `privacy.update_norm_bound`, per optimiser and learning rate.

    python benchmarks/norm_bound.py [--local-steps 6]

configs/synthetic.toml, client 0, every factor of every layer trained, one round from the
initial adapter. The bound is a guard against corrupt or inflated updates, not an estimate:
the table shows its slack.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aslora.config import load_config
from aslora.experiment import prepare
from aslora.privacy import update_norm_bound
from aslora.protocol import ClientJob, GlobalState

REPO = Path(__file__).resolve().parents[1]
SETTINGS = (("sgd", 0.05), ("sgd", 0.5), ("adam", 0.05))


def moved_and_bound(optimizer: str, lr: float, local_steps: int, output: str) -> tuple[float, float, dict]:
    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": output, "optim.optimizer": optimizer, "optim.lr": lr, "federation.local_steps": local_steps}
    )
    setup = prepare(config)
    local, view = setup.local, setup.view
    start = GlobalState(factors=view.get_factors(), head=view.get_head(), scaling={})
    mask = {layer: ("A", "B") for layer in view.layers}
    (update,) = setup.local_engine().train([start], [ClientJob(0, 0, 11, mask)], lambda _: None)
    before = start.tensors()
    moved = sum(float((t - before[n]).square().sum()) for n, t in update.tensors().items()) ** 0.5
    dims = sum(t.numel() for t in update.tensors().values())
    bound = update_norm_bound(
        local.steps, local.lr, optimizer, local.dp.clip, local.dp.noise_multiplier, local.batch_size,
        update.n_examples, dims,
    )
    facts = {"dims": dims, "sigma": local.dp.noise_multiplier, "b": local.batch_size, "n": update.n_examples}
    return moved, bound, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-steps", type=int, default=6)
    args = parser.parse_args()
    table = Table(title=f"update norm bound against one real round ({args.local_steps} local steps)")
    for column in ("optimiser, lr", "moved (L2)", "bound", "bound / moved"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer, lr in SETTINGS:
            moved, bound, facts = moved_and_bound(optimizer, lr, args.local_steps, tmp)
            table.add_row(f"{optimizer}, {lr}", f"{moved:.4g}", f"{bound:.4g}", f"{bound / moved:.2f}")
    console = Console(width=120)
    console.print(table)
    console.print(f"client 0: {facts['dims']} trained values, sigma {facts['sigma']:.4g}, b = {facts['b']}, n = {facts['n']}")


if __name__ == "__main__":
    main()
