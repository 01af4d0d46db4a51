"""What travels between the server and its clients: the global state, one client's job for a
round, and its update. Every engine (in-process, Flower, SecAgg+) moves these and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from aslora.adapters import Factors

Mask = dict[str, tuple[str, ...]]  # layer -> the factors it trains this round


@dataclass(frozen=True)
class GlobalState:
    """The server's model: factors per layer, head, LoRA scalings, method memory."""

    factors: Factors
    head: dict[str, torch.Tensor]
    scaling: dict[str, float]
    memory: dict[str, Any] = field(default_factory=dict)
    # Dense updates folded into the frozen weights (FedEx-LoRA, FLoRA): W = W0 + residual.
    residual: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, flat: Mapping[str, torch.Tensor]) -> GlobalState:
        """The inverse of `tensors()` (scaling and memory stay with the server)."""
        factors: Factors = {}
        head, residual = {}, {}
        for name, tensor in flat.items():
            if name.startswith("head."):
                head[name.removeprefix("head.")] = tensor
            elif name.endswith(".residual"):
                residual[name.removesuffix(".residual")] = tensor
            else:
                layer, factor = name.rsplit(".lora_", 1)
                factors.setdefault(layer, {})[factor] = tensor
        return cls(factors=factors, head=head, scaling={}, residual=residual)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything a client must hold, by name: factors, head, residuals."""
        flat = {f"{layer}.lora_{f}": t for layer, fs in self.factors.items() for f, t in fs.items()}
        flat.update({f"head.{name}": t for name, t in self.head.items()})
        flat.update({f"{layer}.residual": t for layer, t in self.residual.items()})
        return flat

    def evolve(self, **changes: Any) -> GlobalState:
        return replace(self, **changes)


@dataclass(frozen=True)
class ClientJob:
    """One client's work for one round, as the server hands it out."""

    client_id: int
    round_index: int
    seed: int
    mask: Mask
    statistics: str | None = None  # what to measure for the server (Method.statistics; methods/statistics.py)
    rank: int | None = None  # train only the first `rank` LoRA components (heterogeneous ranks)
    fail: bool = False  # a simulated fault: the client drops out before training


@dataclass
class ClientUpdate:
    """What one client returns after a round: only what it trained."""

    client_id: int
    n_examples: int
    factors: Factors
    head: dict[str, torch.Tensor]
    loss: float
    examples_seen: int
    privacy_history: list[tuple[float, float, int]] = field(default_factory=list)
    stats: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    train_time_s: float = 0.0  # the client's wall time for the round, as it measured it

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained factors and head, named as in `GlobalState.tensors()`."""
        return GlobalState(factors=self.factors, head=self.head, scaling={}).tensors()
