"""FedSA-LoRA: A is shared and averaged; B and the head stay with each client.

Clients train both factors from the shared A and their own B and head, and
upload A only. The server averages A. Evaluation reports the clients' own
models on their held-out splits; the "global model" it also reports (shared
A, mean of the clients' B and heads) is an evaluation-only view that a real
FedSA server could not form without extra uploads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from aslora.methods.base import Method, weighted_mean
from aslora.protocol import ClientUpdate, GlobalState, Mask

if TYPE_CHECKING:
    from aslora.config import ExperimentConfig


class FedSA(Method):
    name = "fedsa"
    shares_head = False

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if config.data.holdout_fraction == 0:
            raise ValueError(
                "method 'fedsa' evaluates each client's own model on its held-out split: "
                "set data.holdout_fraction, e.g. 0.1"
            )

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("A", "B") for layer in state.factors}

    def client_start(self, state: GlobalState, client: int) -> GlobalState:
        own = state.memory.get("personal", {}).get(client) or state.memory.get("initial") or _own(state)
        factors = {layer: {"A": fs["A"], "B": own["B"][layer]} for layer, fs in state.factors.items()}
        return state.evolve(factors=factors, head=own["head"])

    def downloaded(self, state: GlobalState) -> dict[str, torch.Tensor]:
        return {f"{layer}.lora_A": fs["A"] for layer, fs in state.factors.items()}

    def uploaded(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        return {f"{layer}.lora_A": fs["A"] for layer, fs in update.factors.items()}

    def personal_states(self, state: GlobalState) -> dict[int, GlobalState]:
        return {c: self.client_start(state, c) for c in state.memory.get("personal", {})}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        initial = state.memory.get("initial") or _own(state)
        personal: dict[int, dict[str, Any]] = dict(state.memory.get("personal", {}))
        for u in updates:
            before = personal.get(u.client_id, initial)
            personal[u.client_id] = {
                "B": {layer: fs["B"] for layer, fs in u.factors.items()},
                "head": u.head or before["head"],  # an untrained head stays what it was
            }
        owners = list(personal.values())
        even = [1.0 / len(owners)] * len(owners)
        factors = {
            layer: {
                "A": weighted_mean([u.factors[layer]["A"] for u in updates], weights),
                "B": weighted_mean([o["B"][layer] for o in owners], even),
            }
            for layer in state.factors
        }
        head = {k: weighted_mean([o["head"][k] for o in owners], even) for k in state.head}
        memory = {"personal": personal, "initial": initial}
        return state.evolve(factors=factors, head=head, memory=memory)


def _own(state: GlobalState) -> dict[str, Any]:
    """A client's starting B and head before it ever trained: the initial ones."""
    return {"B": {layer: fs["B"] for layer, fs in state.factors.items()}, "head": dict(state.head)}
