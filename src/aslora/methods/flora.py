"""FLoRA: stack the clients' factors, merge the exact product into W0, restart the adapters.

Server: [p_1 B_1 ... p_n B_n] [A_1; ...; A_n] = sum_i p_i B_i A_i, times s,
is folded into the frozen weights; every round then starts from fresh
adapters (A drawn anew from the run seed, B = 0). Exact. Stacking allows a
rank r_i per client (`lora.client_ranks`): such a client trains the first r_i
components of the model's rank-r adapter, the rest held at zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from aslora.methods.base import Method, MethodContext
from aslora.protocol import ClientUpdate, GlobalState, Mask


class FLoRA(Method):
    name = "flora"
    needs_context = True
    heterogeneous_ranks = True

    def __init__(self, context: MethodContext) -> None:
        self.seed = context.seed
        self.ranks = context.client_ranks

    def client_rank(self, client: int) -> int | None:
        return self.ranks[client] if self.ranks else None

    def download_for(self, client: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A client of rank r_i receives its r_i components of the fresh adapters."""
        return self._cut(client, tensors)

    def uploaded(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        """A client of rank r_i sends its r_i components (the rest are zero padding)."""
        return self._cut(update.client_id, super().uploaded(update))

    def restored(
        self, client: int, tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The cut factors padded back to the model's rank with the zeros the client holds there."""
        if self.client_rank(client) is None:
            return tensors
        padded = {}
        for name, t in tensors.items():
            if name in like and t.shape != like[name].shape:  # a factor cut to the client's rank
                full = torch.zeros_like(like[name])
                full[tuple(slice(0, n) for n in t.shape)] = t
                t = full
            padded[name] = t
        return padded

    def _cut(self, client: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rank = self.client_rank(client)
        if rank is None:
            return tensors
        return {
            name: t[:rank] if name.endswith("lora_A") else t[:, :rank] if name.endswith("lora_B") else t
            for name, t in tensors.items()
        }

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("A", "B") for layer in state.factors}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        merges = state.memory.get("merges", 0)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + merges + 1)
        residual, factors = dict(state.residual), {}
        for layer, s in state.scaling.items():
            stacked_b = torch.cat([w * u.factors[layer]["B"].double() for u, w in zip(updates, weights, strict=True)], dim=1)
            stacked_a = torch.cat([u.factors[layer]["A"].double() for u in updates], dim=0)
            a = state.factors[layer]["A"]
            previous = residual.get(layer, torch.zeros(stacked_b.shape[0], stacked_a.shape[1], dtype=torch.float64))
            residual[layer] = (previous.double() + s * stacked_b @ stacked_a).to(a.dtype)
            fresh_a = torch.empty_like(a)
            # PEFT's initialisation of lora_A: Kaiming-uniform with a = sqrt(5).
            torch.nn.init.kaiming_uniform_(fresh_a, a=math.sqrt(5), generator=generator)
            factors[layer] = {"A": fresh_a, "B": torch.zeros_like(state.factors[layer]["B"])}
        return state.evolve(factors=factors, residual=residual, memory={"merges": merges + 1})
