"""How the per-example clip splits its budget between the factors a round trains and those it only measures.

    python benchmarks/clip_budget.py RUN_DIR [RUN_DIR ...] [--examples 128] [--share 0.1] [--data-dir ../shared/data]

ALGORITHM.md 4.1 puts every factor, trained or frozen, in one per-example clip, so that the score
can read the frozen factor's privatised gradient. The frozen factor's gradient then takes part of
the clip: the trained factor's clipped gradient shrinks while the noise, sigma C, stays. (The
authors' code can do the same, SCORE_BOTH_COMPONENTS, and says its submitted runs did not.)

At a finished run's adapter (its last checkpoint), on the first `--examples` examples of client 0:
the per-example gradient norms of A, B and the head (every adapted layer), the share of examples
the joint clip shortens, and the norm of the mean clipped gradient of B and the head (what FFA-LoRA
and most of AS-LoRA's layer-rounds train) when the clip covers
- B and the head only (FFA-LoRA; the authors' submitted runs),
- every factor and the head (ALGORITHM.md 4.1, `selection.score_clip_share` unset),
- B and the head at C sqrt(1 - s), A at C sqrt(s) (`selection.score_clip_share = s`).
Each adds the same noise, so a signal's ratio to the first is its signal-to-noise ratio relative
to FFA-LoRA's.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch
from data_dir import add_data_dir
from dp_signal import grad_samples
from rich.console import Console
from rich.table import Table

from aslora.checkpoint import load_checkpoint
from aslora.config import parse_config
from aslora.experiment import prepare


def per_example_gradients(run: Path, examples: int, data_dir: str | None) -> tuple[dict[str, torch.Tensor], float]:
    """Per-example gradients at the run's last adapter, by part ("A", "B", "head": every adapted
    layer's), and the run's clip."""
    checkpoint = load_checkpoint(run)
    if checkpoint is None or checkpoint.config is None:
        raise SystemExit(f"{run} holds no checkpoint with its config; pass a run folder (runs/.../<run id>)")
    config = parse_config(checkpoint.config)
    if data_dir:
        config = config.with_overrides({"data.dir": data_dir})
    setup = prepare(config)
    view, task = setup.view, setup.task
    view.set_factors(checkpoint.state.factors)
    view.set_head(checkpoint.state.head)
    view.set_trainable(dict.fromkeys(view.layers, ("A", "B")), train_head=True)
    shard = setup.shards[0]
    data = task.encode_train(shard.select(range(min(examples, len(shard)))))
    groups = {
        "A": [view.parameter(layer, "A") for layer in view.layers],
        "B": [view.parameter(layer, "B") for layer in view.layers],
        "head": list(view.head.values()),
    }
    samples = iter(grad_samples(setup, [p for ps in groups.values() for p in ps], data))
    return {name: torch.cat([next(samples) for _ in ps], dim=1) for name, ps in groups.items()}, config.privacy.clip


def clipped_signal(trained: torch.Tensor, total_norms: torch.Tensor, bound: float) -> float:
    """|mean of the trained part of each example's gradient, clipped jointly with the rest to `bound`|."""
    return float((trained * (bound / total_norms.clamp(min=bound))[:, None]).mean(0).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--share", type=float, default=0.1, help="selection.score_clip_share to compare")
    add_data_dir(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    table = Table(title=f"The clip's budget at each run's last adapter, {args.examples} examples of client 0")
    for column in ("run", "|g_A| median", "|g_B| median", "|g_head| median", "clipped (joint)",
                   "signal, B+head clip", "joint clip / B+head", f"share {args.share:g} / B+head"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in args.runs:
        grads, clip = per_example_gradients(run, args.examples, args.data_dir)
        norms = {name: g.norm(dim=1) for name, g in grads.items()}
        trained = torch.cat([grads["B"], grads["head"]], dim=1)
        own = trained.norm(dim=1)
        joint = (own.square() + norms["A"].square()).sqrt()
        alone = clipped_signal(trained, own, clip)
        shared = clipped_signal(trained, own, clip * math.sqrt(1 - args.share))
        table.add_row(
            f"{run.parent.parent.name}/{run.parent.name}",
            *(f"{float(norms[name].median()):.3f}" for name in ("A", "B", "head")),
            f"{float((joint > clip).float().mean()):.2f}", f"{alone:.4f}",
            f"{clipped_signal(trained, joint, clip) / alone:.2f}", f"{shared / alone:.2f}",
        )
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
