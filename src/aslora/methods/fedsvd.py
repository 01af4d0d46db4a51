"""FedSVD: B-only rounds, then an SVD re-factorisation of the aggregate, every round.

Server: M = mean(B_i) A; thin SVD M = U S V^T; next A = V_r^T, B = U_r S_r.
Exact (rank(M) <= r), and A follows the aggregate's row space. As published it
takes a full SVD of the d x k product: O(d k min(d, k)) per layer and round,
the cost AS-LoRA's plain average avoids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aslora.methods.base import Method, weighted_mean
from aslora.protocol import ClientUpdate, GlobalState, Mask


class FedSVD(Method):
    name = "fedsvd"

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("B",) for layer in state.factors}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        factors = {}
        for layer, current in state.factors.items():
            a = current["A"]
            b_mean = weighted_mean([u.factors[layer]["B"] for u in updates], weights)
            product = b_mean.double() @ a.double()
            u, s, vh = torch.linalg.svd(product, full_matrices=False)
            r = a.shape[0]
            factors[layer] = {"A": vh[:r].to(a.dtype), "B": (u[:, :r] * s[:r]).to(a.dtype)}
        return state.evolve(factors=factors)
