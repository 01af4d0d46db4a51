"""FedSA-LoRA: A is shared and averaged; B and the head stay with each client.

Clients train both factors from the shared A and their own B and head, upload
A only and keep the rest (`kept`: the client's replica, a SuperNode's own
state under Flower); the server never holds them. Each client scores its own
model on its held-out split (`personal_*` metrics). The dev figures come from
an evaluation-only view, shared A with the mean of the clients' B and heads,
which only an in-process simulation can form (it sees the clients' state): a
real FedSA server could not without extra uploads, and over Flower there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from aslora.methods.base import Method, weighted_mean
from aslora.protocol import ClientUpdate, GlobalState, Mask

if TYPE_CHECKING:
    from aslora.config import ExperimentConfig


class FedSA(Method):
    name = "fedsa"
    personalised = True
    dev_model = (
        "an evaluation-only view, the shared A with the mean of the clients' own B and heads, which a "
        "FedSA server never holds (the clients' own models: personal_*)"
    )

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if config.data.holdout_fraction == 0:
            raise ValueError(
                "method 'fedsa' evaluates each client's own model on its held-out split: "
                "set data.holdout_fraction, e.g. 0.1"
            )

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("A", "B") for layer in state.factors}

    def downloaded(self, state: GlobalState) -> dict[str, torch.Tensor]:
        return {f"{layer}.lora_A": fs["A"] for layer, fs in state.factors.items()}

    def uploaded(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        return {f"{layer}.lora_A": fs["A"] for layer, fs in update.factors.items()}

    def kept(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        own = {f"{layer}.lora_B": fs["B"] for layer, fs in update.factors.items()}
        return own | {f"head.{name}": t for name, t in update.head.items()}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        factors = {
            layer: {**fs, "A": weighted_mean([u.factors[layer]["A"] for u in updates], weights)}
            for layer, fs in state.factors.items()
        }
        return state.evolve(factors=factors)

    def evaluation_view(
        self, state: GlobalState, kept: Sequence[dict[str, torch.Tensor]] | None
    ) -> GlobalState | None:
        """Shared A with the even mean of the B and head the clients that trained keep (evaluation only)."""
        if kept is None:
            return None
        owners = [k for k in kept if k]
        if not owners:
            return state
        mean = {}
        for name in {n for k in owners for n in k}:
            having = [k[name] for k in owners if name in k]
            mean[name] = weighted_mean(having, [1.0 / len(having)] * len(having))
        return GlobalState.from_tensors(state.tensors() | mean).evolve(scaling=state.scaling)
