"""RoLoRA-style layer-tied alternation: all layers train B in even rounds, A in odd rounds.

Exact aggregation (one factor per round, the other shared). The schedule
AS-LoRA is measured against: round-wise alternation without layer-wise choice.
"""

from __future__ import annotations

from aslora.methods.base import AveragingMethod
from aslora.protocol import GlobalState, Mask


class RoLoRA(AveragingMethod):
    name = "rolora"
    linear_server = True

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        factor = "B" if round_index % 2 == 0 else "A"
        return {layer: (factor,) for layer in state.factors}
