"""FlexLoRA: aggregate the full products, then truncate back to rank r with an SVD.

Server: M = sum_i p_i B_i A_i (the common scaling s cancels); thin SVD
M = U S V^T; next A = V_r^T and B = U_r S_r. Exact only while rank(M) <= r;
with several clients the truncation discards the rest (the aggregation error
reports how much). Homogeneous ranks here; the paper truncates per client rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aslora.methods.base import Method, client_factors, mean_product
from aslora.protocol import ClientUpdate, GlobalState, Mask


class FlexLoRA(Method):
    name = "flexlora"

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("A", "B") for layer in state.factors}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        full = [client_factors(state, u) for u in updates]
        factors = {}
        for layer in state.factors:
            a = state.factors[layer]["A"]
            product = mean_product(full, weights, layer)
            u, sv, vh = torch.linalg.svd(product, full_matrices=False)
            r = a.shape[0]
            factors[layer] = {"A": vh[:r].to(a.dtype), "B": (u[:, :r] * sv[:r]).to(a.dtype)}
        return state.evolve(factors=factors)
