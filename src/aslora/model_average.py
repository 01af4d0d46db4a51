"""An exponential moving average of the global model over rounds (federation.ema_decay), the model
the dev split scores and the run exports: Polyak averaging of the DP-SGD iterates, which De et al.
(2022, "Unlocking high-accuracy differentially private image classification through scale") found
worth several points under DP. Post-processing of released models: no privacy cost.

Why: on SST-2 the private global model swings from one evaluation to the next (benchmarks/RESULTS.md,
suite cpu-b128: 0.807 on dev after round 100, 0.725 after 110, 0.788 at the end) while the carved
validation rises steadily, so the last iterate's accuracy is largely the luck of its last steps.

Averaging A and B separately would average the wrong thing (mean(B) mean(A) != mean(BA), the very
error AS-LoRA removes), so each layer's dense update s B A (plus any folded residual) is averaged,
and the averaged model is handed out as the current factors plus a residual that makes up the
difference: W0 + residual + s B A is the average exactly, for every method. Where the frozen encoder
runs in bfloat16 (model.dtype auto), W0 + residual is rounded to it: on a 384 x 384 layer of weights
of size 0.04, about 7 % of an update of size 1e-3 per element, 2 % of one of 3e-3, unbiased.
"""

from __future__ import annotations

from typing import Any

import torch

from aslora.protocol import GlobalState


def dense_updates(state: GlobalState) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight update as the model applies it (s B A + residual), and the head."""
    dense = {}
    for layer, factors in state.factors.items():
        update = state.scaling[layer] * (factors["B"].float() @ factors["A"].float())
        if layer in state.residual:
            update = update + state.residual[layer].float()
        dense[layer] = update
    return dense | {f"head.{name}": t.float() for name, t in state.head.items()}


class ModelAverage:
    """sum_t d^(T-t) (1 - d) x_t over the rounds' models, divided by its total weight (no pull
    towards the initial model, as in Adam's bias correction)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.total: dict[str, torch.Tensor] = {}
        self.weight = 0.0

    def update(self, state: GlobalState) -> None:
        """Fold in the model a round ended at."""
        for name, value in dense_updates(state).items():
            previous = self.total.get(name, torch.zeros_like(value))
            self.total[name] = self.decay * previous + (1 - self.decay) * value
        self.weight = self.decay * self.weight + (1 - self.decay)

    def view(self, state: GlobalState) -> GlobalState:
        """The averaged model, as `state`'s factors plus the residual that makes up the difference."""
        if self.weight == 0:
            return state
        mean = {name: total / self.weight for name, total in self.total.items()}
        current = dense_updates(state)
        residual = {
            layer: (state.residual[layer].float() if layer in state.residual else 0) + mean[layer] - current[layer]
            for layer in state.factors
        }
        head = {name: mean[f"head.{name}"].to(t.dtype) for name, t in state.head.items()}
        return state.evolve(residual=residual, head=head)

    def state_dict(self) -> dict[str, Any]:
        return {"total": dict(self.total), "weight": self.weight}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.total, self.weight = dict(saved["total"]), float(saved["weight"])
