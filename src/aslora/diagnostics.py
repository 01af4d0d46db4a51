"""Selection diagnostics: what each round's update did to a held-out loss, layer by layer, beside
what the selection predicted it would do (ALGORITHM.md section 4.2's score).

The probe set (data.probe_size) is training data the server sets apart before partitioning:
no client trains on it, and nothing private is computed from it. The diagnostics are therefore
the server's own measurements, outside the DP guarantee's scope, and never feed a decision of
a private method (only the non-private oracles decide from them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from torch.utils.data import TensorDataset

from aslora.methods.base import ProbeLoss
from aslora.protocol import GlobalState

if TYPE_CHECKING:
    from aslora.server import RoundRecord


@torch.no_grad()
def mean_loss(
    loss: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    model: torch.nn.Module,
    data: TensorDataset,
    batch_size: int,
) -> float:
    """The task loss of `model` averaged over every example of `data`, in evaluation mode."""
    model.eval()
    total = 0.0
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        total += float(loss(model, batch)) * len(batch[-1])
    model.train()
    return total / len(data)


def changed_layers(before: GlobalState, after: GlobalState) -> list[str]:
    """The layers whose factors the round moved."""
    return [
        layer
        for layer, factors in after.factors.items()
        if any(not torch.equal(tensor, before.factors[layer][name]) for name, tensor in factors.items())
    ]


def realised_decrease(probe: ProbeLoss, before: GlobalState, after: GlobalState) -> dict[str, Any]:
    """The probe loss before the round, its total decrease, and each moved layer's own decrease.

    A layer's decrease is measured with only that layer's new factors swapped into the old model
    (head and every other layer as before), so it is the round's effect through that layer alone.
    """
    base = probe(before)
    per_layer = {
        layer: base - probe(before.evolve(factors={**before.factors, layer: after.factors[layer]}))
        for layer in changed_layers(before, after)
    }
    return {"probe_loss": base, "realised_total": base - probe(after), "realised": per_layer}


def calibration_pairs(records: Sequence[RoundRecord]) -> list[tuple[float, float, str]]:
    """(predicted, realised, factor) for every round and layer that has both.

    The prediction is the score the decision for that round read: the one computed from the
    round before (stored with the round as `diagnostics.predicted`).
    """
    pairs = []
    for record in records:
        predicted: Mapping[str, Mapping[str, float]] = record.diagnostics.get("predicted", {})
        for layer, realised in record.diagnostics.get("realised", {}).items():
            factors = record.mask.get(layer, ())
            if len(factors) == 1 and factors[0] in predicted.get(layer, {}):
                pairs.append((float(predicted[layer][factors[0]]), float(realised), factors[0]))
    return pairs


def share_of_a(records: Sequence[RoundRecord]) -> dict[str, float]:
    """Per layer, the share of rounds in which factor A trained (alone or with B)."""
    layers = list(records[0].mask) if records else []
    return {layer: float(np.mean([("A" in r.mask[layer]) for r in records])) for layer in layers}


def summarise(records: Sequence[RoundRecord]) -> dict[str, Any]:
    """The run's calibration figures: rank correlation of predicted with realised decrease, and
    the share of rounds on A per layer. Empty where the run measured nothing (no probe set)."""
    if not any(r.diagnostics for r in records):
        return {}
    pairs = calibration_pairs(records)
    rho = float(stats.spearmanr([p for p, _, _ in pairs], [r for _, r, _ in pairs]).statistic) if len(pairs) > 2 else None
    realised = [v for r in records for v in r.diagnostics.get("realised", {}).values()]
    return {
        "pairs": len(pairs),
        "spearman_predicted_realised": rho if rho is None or np.isfinite(rho) else None,
        "mean_realised_decrease": float(np.mean(realised)) if realised else None,
        "share_of_rounds_on_a": share_of_a(records),
    }
