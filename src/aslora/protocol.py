"""What travels between the server and its clients: the global state, one client's job for a
round (with its download), and its update. Every engine (in-process, Flower, SecAgg+) moves these
and nothing else, serialised by `pack`, so the bytes it reports are those of what it sent."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

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
    # What changed on the server since the client last synchronised, cut to what it needs (FLoRA: its rank).
    download: dict[str, torch.Tensor] = field(default_factory=dict)
    evaluate: bool = False  # a personalised method's evaluation round: the client scores its own model
    base: int = -1  # the round whose download the client last received (-1: none, the seeded initial)
    lr_multiplier: float = 1.0  # this round's lr as a multiple of optim.lr (optim.lr_schedule, 'secant_decay')

    def header(self) -> dict[str, Any]:
        """The job without its download, as JSON-able values."""
        return {
            "client_id": self.client_id, "round_index": self.round_index, "seed": self.seed,
            "mask": {layer: list(fs) for layer, fs in self.mask.items()}, "statistics": self.statistics,
            "rank": self.rank, "fail": self.fail, "evaluate": self.evaluate, "base": self.base,
            "lr_multiplier": self.lr_multiplier,
        }

    @classmethod
    def from_header(cls, header: Mapping[str, Any], download: dict[str, torch.Tensor]) -> ClientJob:
        fields = dict(header) | {"mask": {layer: tuple(fs) for layer, fs in header["mask"].items()}}
        return cls(**fields, download=download)


@dataclass
class ClientUpdate:
    """What one client returns after a round: only what it trained."""

    client_id: int
    n_examples: int
    factors: Factors
    head: dict[str, torch.Tensor]
    examples_seen: int
    # Each local step's batch loss, in order (None: an empty Poisson batch): where a round's own
    # steps raise the loss, the local step overshoots (train_loss_by_step in metrics.jsonl).
    step_losses: list[float | None] = field(default_factory=list)
    # Each local step's lr as a multiple of optim.lr (optim.step_control; empty without).
    step_lr_multipliers: list[float] = field(default_factory=list)
    privacy_history: list[tuple[float, float, int]] = field(default_factory=list)
    stats: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    train_time_s: float = 0.0  # the client's wall time for the round, as it measured it
    # A personalised method's own evaluation (ClientJob.evaluate): its model on its held-out split.
    personal_metrics: dict[str, float] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained factors and head, named as in `GlobalState.tensors()`."""
        return GlobalState(factors=self.factors, head=self.head, scaling={}).tensors()

    @property
    def loss(self) -> float:
        """The round's mean training loss over its non-empty steps (NaN if every batch was empty)."""
        losses = [loss for loss in self.step_losses if loss is not None]
        return sum(losses) / len(losses) if losses else math.nan


@dataclass
class Delivery:
    """One client's round trip, as the engine that carried it measured it."""

    result: ClientUpdate | Exception
    bytes_down: int  # the download as sent (`pack`ed tensors)
    bytes_up: int = 0  # the reply as received; 0 when none came back


def pack(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any] | None = None) -> bytes:
    """Tensors (and a JSON header) as the one safetensors blob that travels; b"" when empty."""
    if not tensors and header is None:
        return b""
    metadata = {"header": json.dumps(header)} if header is not None else None
    return save_tensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The inverse of `pack`: the tensors and the header."""
    if not blob:
        return {}, None
    # safetensors.torch.load drops the metadata; its format documents the header: an 8-byte
    # little-endian length, then JSON whose "__metadata__" holds the string map `pack` wrote.
    length = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8 : 8 + length]).get("__metadata__") or {}
    return load_tensors(blob), json.loads(metadata["header"]) if "header" in metadata else None
