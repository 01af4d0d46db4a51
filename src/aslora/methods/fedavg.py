"""Vanilla federated LoRA (FedIT): both factors trained, averaged separately.

Inexact: mean(B_i) mean(A_i) != mean(B_i A_i); the gap is what section 5's
aggregation error measures.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aslora.methods.base import AveragingMethod
from aslora.protocol import GlobalState, Mask


class FedAvg(AveragingMethod):
    name = "fedavg"
    linear_server = True
    # The trained head at twice the factors' lr: in configs/paper/*.toml FedAvg's factors step at lr 2
    # (lr 4 collapses A) while the one-factor methods' head steps at 4, so this control separates the
    # head's lr from the averaging rule in the early rounds (benchmarks/RESULTS.md, 2026-12-07 night).
    variants: ClassVar[dict[str, dict[str, Any]]] = {
        "fedavg head2x": {"method": "fedavg", "optim.head_lr_scale": 2.0},
    }

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("A", "B") for layer in state.factors}
