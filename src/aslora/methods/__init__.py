"""The federated LoRA methods, by name: the one registry the rest of the software reads.

A method is one file here: its class declares its client rule, server rule,
config checks and properties (methods/base.py). A new file here is found
at import, and every command, engine and benchmark knows the method.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from aslora.methods.base import Method, MethodContext


def _discover() -> list[type[Method]]:
    """Every concrete Method defined in a module of this package: a new method is one new file."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [
            obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, Method) and obj.__module__ == module.__name__
            and not inspect.isabstract(obj)
        ]
    return sorted(found, key=lambda m: (m.oracle, m.name))


_CLASSES = _discover()
REGISTRY: dict[str, type[Method]] = {m.name: m for m in _CLASSES}
METHODS = tuple(REGISTRY)  # every name a config may give
NAMES = tuple(n for n, m in REGISTRY.items() if not m.oracle)  # the methods a comparison runs
ORACLES = {n: m for n, m in REGISTRY.items() if m.oracle}  # non-private upper bounds
SECURE = tuple(n for n, m in REGISTRY.items() if m.linear_server)  # those SecAgg+ can aggregate
# Named variants of the methods (AS-LoRA's ablations), as config overrides.
ABLATIONS: dict[str, dict[str, Any]] = {name: o for m in _CLASSES for name, o in m.variants.items()}


def method_class(name: str) -> type[Method]:
    """The class of the method called `name`."""
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return REGISTRY[name]


def get_method(name: str, context: MethodContext | None = None) -> Method:
    """A fresh instance of the named method; those with `needs_context` need the run's context."""
    cls = method_class(name)
    if not cls.needs_context:
        return cls()
    if context is None:
        raise ValueError(f"method {name!r} needs a MethodContext (selection, step size, noise, seed)")
    return cls(context)  # type: ignore[call-arg]


__all__ = [
    "ABLATIONS", "METHODS", "NAMES", "ORACLES", "REGISTRY", "SECURE", "Method", "MethodContext", "get_method",
    "method_class",
]
