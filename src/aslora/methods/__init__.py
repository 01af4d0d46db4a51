"""The federated LoRA methods, by name."""

from __future__ import annotations

from aslora.methods.base import ClientUpdate, GlobalState, Mask, Method
from aslora.methods.fedavg import FedAvg
from aslora.methods.ffa import FFA

_METHODS: dict[str, type[Method]] = {m.name: m for m in (FedAvg, FFA)}


def get_method(name: str) -> Method:
    """A fresh instance of the named method."""
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]()


__all__ = ["ClientUpdate", "GlobalState", "Mask", "Method", "get_method"]
