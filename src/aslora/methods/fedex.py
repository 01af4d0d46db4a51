"""FedEx-LoRA: average A and B, and fold the exact residual into the frozen weights.

Server: A = mean(A_i), B = mean(B_i), and W0 += s (sum_i p_i B_i A_i - B A):
exact, at the price of a dense d x k download (counted in the bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aslora.methods.base import AveragingMethod, client_factors, mean_product
from aslora.protocol import ClientUpdate, GlobalState, Mask


class FedEx(AveragingMethod):
    name = "fedex"

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("A", "B") for layer in state.factors}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        averaged = super().aggregate(state, updates, weights)
        full = [client_factors(state, u) for u in updates]
        residual = dict(state.residual)
        for layer, s in state.scaling.items():
            ideal = mean_product(full, weights, layer)
            new = averaged.factors[layer]
            gap = s * (ideal - new["B"].double() @ new["A"].double())
            previous = residual.get(layer, torch.zeros_like(gap))
            residual[layer] = (previous.double() + gap).to(new["A"].dtype)
        return averaged.evolve(residual=residual)
