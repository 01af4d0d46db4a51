"""LS-refit: FedAvg-LoRA whose server refits B to the averaged A by least squares.

Clients train A and B as in FedAvg-LoRA. The server averages A, then takes
the B that brings B A closest to the ideal update in Frobenius norm:

    B = argmin_B || sum_i p_i B_i A_i - B A ||_F = sum_i p_i B_i (A_i A^T) (A A^T)^+

the projection of the ideal update onto A's row space, so its aggregation
error is never above FedAvg's and is zero when the clients' A agree. It needs
no dense d x k matrix (r x r products only) and downloads what FedAvg does.
The server-side correction of B follows the idea of LoRA-FAIR (Bian et al.,
ICCV 2025) without its similarity objective and regulariser; it is not that
method. It is also this project's example of a method added as one file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aslora.methods.base import Method, average_trained_factors, client_factors
from aslora.protocol import ClientUpdate, GlobalState, Mask


class LeastSquaresRefit(Method):
    name = "refit"

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("A", "B") for layer in state.factors}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        factors = average_trained_factors(state, updates, weights)
        full = [client_factors(state, u) for u in updates]
        for layer, fs in factors.items():
            a = fs["A"].double()
            gram_inverse = torch.linalg.pinv(a @ a.T, hermitian=True)
            target = sum(float(w) * (f[layer]["B"].double() @ (f[layer]["A"].double() @ a.T))
                         for f, w in zip(full, weights, strict=True))
            fs["B"] = (target @ gram_inverse).to(fs["B"].dtype)
        return state.evolve(factors=factors)
