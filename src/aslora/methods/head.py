"""The private linear probe: the adapters stay at their initialisation (B = 0, so the encoder is
the pretrained one) and only the task head trains under DP-SGD, averaged by the server.

Not a LoRA method but the reference a DP fine-tuning comparison is read against (Tramer and Boneh,
ICLR 2021): what the frozen features give a private head at the same epsilon, sampling and steps,
so that what the adapters add over it is measured, not assumed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aslora.methods.base import AveragingMethod
from aslora.protocol import GlobalState, Mask

if TYPE_CHECKING:
    from aslora.config import ExperimentConfig


class HeadOnly(AveragingMethod):
    name = "head"
    linear_server = True
    plots = ()  # no factor ever trains: no mask to draw

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if not config.lora.train_head or not config.lora.head_modules:
            raise ValueError(
                "method 'head' (the private linear probe) trains the task head alone: set "
                "lora.train_head = true and name the head in lora.head_modules, e.g. ['classifier']"
            )

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: () for layer in state.factors}
