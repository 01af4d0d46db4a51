"""Vanilla federated LoRA (FedIT): both factors trained, averaged separately.

Inexact: mean(B_i) mean(A_i) != mean(B_i A_i); the gap is what section 5's
aggregation error measures.
"""

from __future__ import annotations

from aslora.methods.base import AveragingMethod
from aslora.protocol import GlobalState, Mask


class FedAvg(AveragingMethod):
    name = "fedavg"
    linear_server = True

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("A", "B") for layer in state.factors}
