"""The federated LoRA methods, by name."""

from __future__ import annotations

from aslora.methods.aslora import ASLoRA, SelectionContext
from aslora.methods.base import ClientUpdate, GlobalState, Mask, Method
from aslora.methods.fedavg import FedAvg
from aslora.methods.ffa import FFA
from aslora.methods.rolora import RoLoRA

_SIMPLE: dict[str, type[Method]] = {m.name: m for m in (FedAvg, FFA, RoLoRA)}
NAMES = (*_SIMPLE, ASLoRA.name)


def get_method(name: str, selection: SelectionContext | None = None) -> Method:
    """A fresh instance of the named method; 'aslora' needs its selection context."""
    if name == ASLoRA.name:
        if selection is None:
            raise ValueError("method 'aslora' needs a SelectionContext (step size, steps, DP noise)")
        return ASLoRA(selection)
    if name not in _SIMPLE:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(NAMES)}")
    return _SIMPLE[name]()


__all__ = ["ClientUpdate", "GlobalState", "Mask", "Method", "SelectionContext", "get_method"]
