"""The lookahead oracle: a NON-PRIVATE upper bound for AS-LoRA's per-layer, per-round choice.

Every round the sampled clients train twice, once with every layer on A and once with every
layer on B (same clients, same seeds); each trial is averaged exactly, and then, layer by
layer, the server keeps the factor whose averaged update lowers the loss on its probe set
(data.probe_size) more. Not a private method: it decides from data the server holds and
trains twice, so each round is charged twice; run it with the private methods' noise
multiplier (privacy.noise_multiplier, no epsilon budget) to compare decisions at equal noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aslora.methods.base import AveragingMethod, ProbeLoss
from aslora.protocol import GlobalState, Mask

if TYPE_CHECKING:
    from aslora.config import ExperimentConfig


class LookaheadOracle(AveragingMethod):
    name = "oracle"
    oracle = True

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if config.data.probe_size == 0:
            raise ValueError(
                "method 'oracle' (the non-private lookahead oracle) keeps, per layer, the factor that lowers "
                "the loss on the server's probe set: set data.probe_size, e.g. 512"
            )

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        return {layer: ("B",) for layer in state.factors}  # unused: `trials` replaces it

    def trials(self, round_index: int, state: GlobalState) -> list[Mask]:
        return [{layer: (factor,) for layer in state.factors} for factor in ("A", "B")]

    def choose(
        self,
        state: GlobalState,
        candidates: Sequence[tuple[Mask, GlobalState]],
        probe: ProbeLoss,
    ) -> tuple[GlobalState, Mask]:
        """Per layer, the trial whose update alone lowers the probe loss most; the head comes
        from the trial that lowers it most as a whole."""
        base = probe(state)
        factors, mask, decrease = {}, {}, {}
        for layer in state.factors:
            losses = [probe(state.evolve(factors={**state.factors, layer: c.factors[layer]})) for _, c in candidates]
            best = min(range(len(candidates)), key=losses.__getitem__)
            factors[layer], mask[layer] = candidates[best][1].factors[layer], candidates[best][0][layer]
            decrease[layer] = {m[layer][0]: base - loss for (m, _), loss in zip(candidates, losses, strict=True)}
        whole = min(candidates, key=lambda c: probe(c[1]))[1]
        history = [*state.memory.get("history", []), {layer: f[0] for layer, f in mask.items()}]
        memory = {"history": history, "lookahead": decrease}
        return state.evolve(factors=factors, head=whole.head, memory=memory), mask

    def describe(self, state: GlobalState) -> dict[str, Any]:
        """Each layer's probe-loss decrease under either factor this round: what it chose from."""
        return {k: state.memory[k] for k in ("lookahead",) if k in state.memory}
