"""Step sizes: a client's local step from its own privatised gradients (optim.step_control), and
the server's lr schedule over rounds (optim.lr_schedule).

Why: on label-skewed shards the lr that is stable at the start of a run can overshoot a client's
own loss later, once A has turned towards the activations and a step on B moves the logits
further (RESULTS.md: one B-and-head step at lr 4 takes a client's batch loss from 0.72 to 1.83,
signal alone, noise off). The next local step then starts from there. The step before and the
gradient after it are enough to see it: along the last step dw = -lr g1 the loss is a quadratic
whose slope and curvature the two privatised gradients give, so the next step is shortened to
land where that quadratic is lowest (the Barzilai-Borwein idea, capped at the configured lr).
Only released gradients enter: post-processing, no privacy cost, and a step never grows, so
the update norm bound still holds. No library does this for DP-SGD's noisy gradients (the
noise terms below are what it needs), hence these few lines.
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from aslora.config import ALrRule, LrSchedule, StepControl

CONTROLS: tuple[str, ...] = get_args(StepControl)


class SecantStepControl:
    """Scales every local SGD step after the first by the last step's a* (below), within [0, 1].

    With dw = -lr_p g1_p per parameter p (lr_p its group's lr, times the multiplier it got) and g2
    the next privatised gradient, both carrying noise of variance `nu` per coordinate:
      slope     = sum lr_p (||g1_p||^2 - nu dim_p)            (the signal's decrease per unit step)
      curvature = slope - sum lr_p <g1_p, g2_p>               (dw^T H dw, the noise of g1 removed)
    The loss along w0 + a dw is L0 - a slope + a^2 curvature / 2, lowest at a* = slope / curvature;
    a step of the last step's lr times a* from w0 + dw along g2 lands there (exact in one dimension). A
    curvature <= 0 shows no overshoot: the step keeps its lr. a* < 0 (no signal left, only noise):
    the step is skipped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, nu: float) -> None:
        self.groups = optimizer.param_groups
        self.base = [group["lr"] for group in self.groups]
        self.nu = nu
        self.previous: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (param, its gradient, its lr)
        self.multipliers: list[float] = []  # one per step, in order

    @torch.no_grad()
    def __call__(self) -> None:
        """Before each step, on the gradient about to be applied: set this step's lr."""
        multiplier = self._multiplier() if self.previous else 1.0
        self.previous = []
        for group, base in zip(self.groups, self.base, strict=True):
            group["lr"] = base * multiplier
            self.previous += [(p, p.grad.detach().clone(), group["lr"]) for p in group["params"] if p.grad is not None]
        self.multipliers.append(multiplier)

    def _multiplier(self) -> float:
        slope = cross = 0.0
        for p, g1, lr in self.previous:
            if p.grad is None:
                continue
            slope += lr * (float(g1.double().square().sum()) - self.nu * g1.numel())
            cross += lr * float((g1.double() * p.grad.double()).sum())
        curvature = slope - cross
        if curvature <= 0:
            return 1.0
        return min(max(self.multipliers[-1] * slope / curvature, 0.0), 1.0)


def next_round_multiplier(current: float, last_steps: list[float]) -> float:
    """'secant_decay': the lr (as a multiple of optim.lr) the next round starts at: the mean of the
    lrs the clients' last steps ended at (`current` where none was measured). A reported value is
    a client's word: one that is not finite is ignored, and each is held within [0, current], so no
    client can raise the lr of the others.

    Why: the control shortens only the steps after the first, and from RoLoRA's seed-1 run the
    first step of each round kept overshooting more as A aligned (the clients' batch loss after
    it 0.64, 0.93, 1.30 at rounds 8, 10, 12, while the second steps were shortened to 0.79-0.85 of
    lr). Carrying the shortened lr into the next round makes it a decay set by measurement: it
    never grows, and it shrinks only where the steps overshoot.
    """
    values = [min(max(m, 0.0), current) for m in last_steps if math.isfinite(m)]
    return sum(values) / len(values) if values else current


def scheduled_multiplier(schedule: str, round_index: int, rounds: int, final_scale: float) -> float:
    """optim.lr_schedule: round `round_index`'s lr as a multiple of optim.lr. 'cosine' falls from 1
    at round 0 to `final_scale` past the last round (SGDR's half cosine, Loshchilov & Hutter 2017).

    Why: at a constant lr DP-SGD settles in a noise ball whose size grows with the lr; shrinking
    the lr over the last rounds averages that noise away (on SST-2's 30 x 1 regime it gained
    nothing: the plateau there is not the noise ball, RESULTS.md tenth screen). A function of the
    round alone: post-processing, no privacy cost, and a resumed run continues it exactly.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return final_scale + (1.0 - final_scale) * (1.0 + math.cos(math.pi * round_index / rounds)) / 2.0
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(get_args(LrSchedule))}")


def a_step_scale(rule: ALrRule, cap: float, a: torch.Tensor, b: torch.Tensor) -> float:
    """A layer's A lr as a multiple of lr (optim.a_lr_rule): `cap` (a_lr_scale), or under 'balanced'
    min(cap, |A|_F / |B|_F), which equalises how far a step on either factor moves W = B A (B dA
    against dB A); a zero B moves nothing through A, so it keeps the cap."""
    if rule == "fixed":
        return cap
    b_norm = float(b.detach().double().norm())
    return cap if b_norm == 0 else min(cap, float(a.detach().double().norm()) / b_norm)
