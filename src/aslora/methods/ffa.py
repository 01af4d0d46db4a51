"""FFA-LoRA: A frozen at its seeded initialisation for the whole run, B trained.

Exact aggregation, since every client shares A: mean(B_i) A = mean(B_i A).
"""

from __future__ import annotations

from aslora.methods.base import AveragingMethod
from aslora.protocol import GlobalState, Mask


class FFA(AveragingMethod):
    name = "ffa"
    linear_server = True

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("B",) for layer in state.factors}
