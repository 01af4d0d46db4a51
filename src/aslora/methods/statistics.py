"""What a client measures for its method's server, by kind (`Method.statistics`).

A kind decides which parameters join the DP-SGD step, what is recorded after
each privatised gradient, how the clip budget is split, and which layers and
factors the upload's statistics must cover. The client and the server look
the kind up here by name (the name is what crosses the wire), so neither
branches on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch

from aslora.adapters import FACTORS, LoraView
from aslora.privacy import ClipGroups
from aslora.protocol import Mask
from aslora.selection import FactorStats, LastStepTracker, MomentTracker


class Tracker(Protocol):
    def observe(self) -> None: ...

    def statistics(self, nu: float) -> FactorStats: ...


@dataclass
class ClientRule:
    """One round's local training, as a statistics kind sets it up."""

    params: list[torch.nn.Parameter]  # what joins the per-sample gradient
    tracker: Tracker | None = None
    on_gradient: Callable[[], None] | None = None  # after each privatised gradient, before the step
    clip_groups: ClipGroups | None = None  # None: one joint clip

    def statistics(self, nu: float) -> FactorStats:
        return self.tracker.statistics(nu) if self.tracker is not None else {}


@dataclass(frozen=True)
class Kind:
    """A statistics kind: how a client trains and measures, and what the server expects back."""

    name: str
    prepare: Callable[[LoraView, Mask, bool, float | None], ClientRule]
    covers: Callable[[list[str], Mask], dict[str, set[str]]] = field(
        default=lambda layers, mask: {layer: set(fs) for layer, fs in mask.items() if fs}
    )


def _plain(view: LoraView, mask: Mask, train_head: bool, share: float | None) -> ClientRule:
    """Only the masked factors (and the head) train; nothing is measured."""
    return ClientRule(view.set_trainable(mask, train_head))


def _moments(
    view: LoraView, mask: Mask, train_head: bool, share: float | None, secant: bool = False
) -> ClientRule:
    """Every factor joins the per-sample gradient (one joint clip, or with `share` the inactive
    factors clipped to that share of C^2 and the rest to the remainder); the privatised gradient of
    every factor feeds the moment tracker, and only the masked factors are updated."""
    params = view.set_trainable(dict.fromkeys(view.layers, FACTORS), train_head)
    inactive = [(layer, f) for layer in view.layers for f in FACTORS if f not in mask.get(layer, ())]
    frozen = [view.parameter(layer, f) for layer, f in inactive]
    clip_groups, scales = None, {}
    if share is not None:
        trained = [p for p in params if all(p is not q for q in frozen)]
        clip_groups = [(frozen, share), (trained, 1 - share)]
        scales = dict.fromkeys(inactive, math.sqrt((1 - share) / share))
    tracker = MomentTracker(
        {(layer, f): view.parameter(layer, f) for layer in view.layers for f in FACTORS}, scales, secant
    )

    def on_gradient() -> None:
        tracker.observe()
        for p in frozen:  # seen by the score, never applied: inactive factors stay put
            p.grad = None

    return ClientRule(params, tracker, on_gradient, clip_groups)


def _last_step(view: LoraView, mask: Mask, train_head: bool, share: float | None) -> ClientRule:
    """The masked factors train; their final privatised gradient is kept (the official score)."""
    tracker = LastStepTracker({(layer, f): view.parameter(layer, f) for layer, fs in mask.items() for f in fs})
    return ClientRule(view.set_trainable(mask, train_head), tracker, tracker.observe)


def _every_factor(layers: list[str], mask: Mask) -> dict[str, set[str]]:
    """Statistics of both factors of every layer, trained or not."""
    return {layer: set(FACTORS) for layer in layers}


KINDS: dict[str | None, Kind] = {
    None: Kind("none", _plain, lambda layers, mask: {}),
    "moments": Kind("moments", _moments, _every_factor),
    "last_step": Kind("last_step", _last_step),
    # the moments and K, the secant curvature of consecutive privatised gradients (score 'secant')
    "secant": Kind("secant", partial(_moments, secant=True), _every_factor),
}


def kind(name: str | None) -> Kind:
    """The statistics kind called `name` (None: no statistics)."""
    if name not in KINDS:
        raise ValueError(f"unknown statistics kind {name!r}; known: {', '.join(k for k in KINDS if k)}")
    return KINDS[name]
