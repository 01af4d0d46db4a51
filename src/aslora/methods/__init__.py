"""The federated LoRA methods, by name."""

from __future__ import annotations

from aslora.methods.aslora import ASLoRA
from aslora.methods.base import ClientUpdate, GlobalState, Mask, Method, MethodContext
from aslora.methods.fedavg import FedAvg
from aslora.methods.fedex import FedEx
from aslora.methods.fedsa import FedSA
from aslora.methods.fedsvd import FedSVD
from aslora.methods.ffa import FFA
from aslora.methods.flexlora import FlexLoRA
from aslora.methods.flora import FLoRA
from aslora.methods.oracle import LookaheadOracle
from aslora.methods.rolora import RoLoRA

_PLAIN: dict[str, type[Method]] = {m.name: m for m in (FedAvg, FFA, RoLoRA, FedSA, FedEx, FedSVD, FlexLoRA)}
_WITH_CONTEXT = {m.name: m for m in (ASLoRA, FLoRA)}
NAMES = (*_PLAIN, *_WITH_CONTEXT)
# Non-private upper bounds, beside the methods but never among the baselines of a comparison.
ORACLES: dict[str, type[Method]] = {m.name: m for m in (LookaheadOracle,)}
# AS-LoRA's ablations (ALGORITHM.md): one choice of the selection switched, as config overrides.
ABLATIONS: dict[str, dict[str, str]] = {
    "aslora tied": {"method": "aslora", "selection.granularity": "tied"},
    "aslora first_order": {"method": "aslora", "selection.score": "first_order"},
    "aslora random": {"method": "aslora", "selection.score": "random"},
    # the authors' rule (ALGORITHM.md section 7), scored per block as in their code (q and v summed)
    "aslora official": {
        "method": "aslora", "selection.rule": "official", "selection.granularity": "group", "selection.groups": ["block"],
    },
}


def get_method(name: str, context: MethodContext | None = None) -> Method:
    """A fresh instance of the named method; 'aslora' and 'flora' need the run's context."""
    if name in _WITH_CONTEXT:
        if context is None:
            raise ValueError(f"method {name!r} needs a MethodContext (selection, step size, noise, seed)")
        return _WITH_CONTEXT[name](context)
    if name in ORACLES:
        return ORACLES[name]()
    if name not in _PLAIN:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join((*NAMES, *ORACLES))}")
    return _PLAIN[name]()


__all__ = ["ABLATIONS", "NAMES", "ORACLES", "ClientUpdate", "GlobalState", "Mask", "Method", "MethodContext", "get_method"]
