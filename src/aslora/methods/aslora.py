"""AS-LoRA: every layer trains one factor per round, chosen from EMA-smoothed scores.

Aggregation averages each layer's active factor (exact). With rule 'spec' the
choice for the next round comes from the clients' privatised-gradient
statistics (G, Q, T per layer and factor), scored, smoothed and decided as in
sections 4.1-4.3. With rule 'official' it follows the authors' code (section
7): warm-up alternation, then a sigmoid draw with decaying temperature from an
EMA of the active factor's last-step projected gradient norm. Their late-round
curvature correction evaluates the private batch without noise, outside the
DP accountant; this implementation refuses it, so 'official' here is that
rule minus that term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from aslora.config import SCORED, ExperimentConfig
from aslora.methods.base import AveragingMethod, MethodContext
from aslora.protocol import ClientUpdate, GlobalState, Mask
from aslora.selection import (
    DecisionSettings,
    FactorStats,
    ScoreSettings,
    decide,
    decide_official,
    kappa,
    layer_groups,
    mean_statistics,
    official_warmup,
    pinned_layers,
    score,
    secant_score,
    step_load,
    update_curvature,
    update_ema,
    update_lead_sq,
)

# This project's score and decision (README "AS-LoRA's secant score"): needs 2+ local steps.
SECANT: dict[str, Any] = {
    "method": "aslora", "selection.score": "secant", "selection.floor_g": False,
    "selection.score_clip_share": 0.1, "selection.confidence": 0.5, "selection.confident_factors": "B",
}
# The authors' rule (ALGORITHM.md section 7), scored per block as in their code (q and v summed).
OFFICIAL: dict[str, Any] = {
    "method": "aslora", "selection.rule": "official", "selection.granularity": "group", "selection.groups": ["block"],
}


class ASLoRA(AveragingMethod):
    name = "aslora"
    needs_context = True
    linear_server = True
    plots = ("mask", "calibration")
    # The ablations of ALGORITHM.md: one choice of the selection switched.
    variants: ClassVar[dict[str, dict[str, Any]]] = {
        "aslora tied": {"method": "aslora", "selection.granularity": "tied"},
        "aslora first_order": {"method": "aslora", "selection.score": "first_order"},
        "aslora random": {"method": "aslora", "selection.score": "random"},
        # this project's departures from the spec (README), each alone or with the unbiased G
        "aslora unfloored": {"method": "aslora", "selection.floor_g": False},
        "aslora frozen": {"method": "aslora", "selection.ema_from": "frozen"},
        "aslora budget": {"method": "aslora", "selection.a_budget": 0.5, "selection.floor_g": False},
        # the spec's score, with the trained factors keeping 0.9 of the clip budget: under the joint
        # clip the frozen A's per-sample gradient takes half of B's clipped signal on SST-2
        # (benchmarks/clip_budget.py); G unfloored, as the frozen factors are measured through more noise
        "aslora clip-share": {"method": "aslora", "selection.score_clip_share": 0.1, "selection.floor_g": False},
        # the same, each layer's A step capped at |A| / |B| of lr (optim.a_lr_rule 'balanced'): at epsilon 1
        # B grows mostly by DP noise (|B| 20-45 against |A| 1.6), and the A rounds then put that much more
        # noise into W (README "The A step's size")
        "aslora balanced": {
            "method": "aslora", "selection.score_clip_share": 0.1, "selection.floor_g": False,
            "optim.a_lr_rule": "balanced",
        },
        "aslora secant": SECANT,
        # the same, with an unsure unit on B (FFA-LoRA's schedule) instead of alternating
        "aslora secant b-default": SECANT | {"selection.unsure": "B"},
        "aslora official": OFFICIAL,
        # the same rule with the clients weighted by their examples, as every other method: its selection
        # apart from the authors' uniform average
        "aslora official-weighted": OFFICIAL | {"selection.official_weights": "examples"},
    }

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        selection = config.selection
        if selection.rule == "spec" and selection.score == "secant" and config.federation.local_steps < 2:
            raise ValueError(
                "selection.score='secant' measures curvature between consecutive local steps: set "
                f"federation.local_steps to 2 or more (it is {config.federation.local_steps}), or choose "
                "score 'curvature'"
            )

    def __init__(self, context: MethodContext) -> None:
        self.context = context
        self.official = context.selection.rule == "official"
        if self.official:
            self.statistics = "last_step"
        elif context.selection.score == "secant":
            self.statistics = "secant"
        elif context.selection.score in SCORED:
            self.statistics = "moments"

    def _decision(self, state: GlobalState) -> DecisionSettings:
        c = self.context.selection
        return DecisionSettings(
            score=c.score,
            groups=layer_groups(list(state.factors), c.granularity, c.groups),
            hysteresis=c.hysteresis,
            min_dwell=c.min_dwell,
            warmup_rounds=c.warmup_rounds,
            seed=self.context.seed,
            a_budget=c.a_budget,
            confidence=c.confidence,
            confident_factors=c.confident_factors,
            unsure=c.unsure,
            beta=c.beta,
            pinned_b=pinned_layers(list(state.factors), c.pinned_b),
        )

    def plan(self, round_index: int, state: GlobalState) -> Mask:
        memory = state.memory
        decision = self._decision(state)
        if self.official:
            warmup = official_warmup(self.context.rounds)
            mask = decide_official(round_index, decision.groups, memory.get("ema", {}), warmup, self.context.seed)
        else:
            mask = decide(
                round_index, decision, memory.get("ema", {}), memory.get("history", []), memory.get("lead_sq")
            )
        return {layer: (factor,) for layer, factor in mask.items()}

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        new = super().aggregate(state, updates, weights)
        trained = {layer: next(iter(factors)) for layer, factors in updates[0].factors.items()}
        memory: dict[str, Any] = {
            "history": [*state.memory.get("history", []), trained],
            "ema": state.memory.get("ema", {}),
        }
        if self.official:
            stats = mean_statistics([u.stats for u in updates], weights)
            scores = {layer: {f: v["S"] for f, v in fs.items()} for layer, fs in stats.items()}
            ema = update_ema(memory["ema"], scores, self.context.selection.beta)
            memory.update(stats=stats, scores=scores, ema=ema)
        elif self.statistics is not None:
            stats = mean_statistics([u.stats for u in updates], weights)
            c = self.context
            if self.statistics == "secant":
                curvature = self._curvature(state, stats, trained)
                scores = self._secant_scores(new, stats, curvature)
                memory["curvature"] = curvature
            else:
                scores = {
                    layer: {
                        f: score(
                            values, ScoreSettings(c.selection.score, c.eta_of(f, new.factors[layer]), c.tau, c.nu),
                            len(updates),
                        )
                        for f, values in factors.items()
                    }
                    for layer, factors in stats.items()
                }
            smoothed = scores
            if c.selection.ema_from == "frozen":  # the trained factor's statistics saw it move: not comparable
                smoothed = {layer: {f: v for f, v in fs.items() if f != trained[layer]} for layer, fs in scores.items()}
            memory.update(stats=stats, scores=scores, ema=update_ema(memory["ema"], smoothed, c.selection.beta))
            if c.selection.confidence is not None:
                groups = self._decision(state).groups
                memory["lead_sq"] = update_lead_sq(state.memory.get("lead_sq", {}), scores, groups, c.selection.beta)
        return new.evolve(memory=memory)

    def _load(self, state: GlobalState, layer: str, factor: str, stats: dict[str, float]) -> float:
        """The step load of `factor` at `state` (selection.step_load): its partner's size, its noise."""
        factors = state.factors[layer]
        partner = factors["B" if factor == "A" else "A"]
        rank = factors["A"].shape[0]
        return step_load(stats, float(partner.double().square().sum()), rank, self.context.nu, factors[factor].numel())

    def _curvature(
        self, state: GlobalState, stats: FactorStats, trained: dict[str, str]
    ) -> dict[str, dict[str, float]]:
        """Each layer's running sums for kappa, from the factor it trained this round (at `state`)."""
        curvature = dict(state.memory.get("curvature", {}))
        for layer, factors in stats.items():
            f = trained[layer]
            load = self._load(state, layer, f, factors[f])
            curvature[layer] = update_curvature(
                curvature.get(layer), factors[f], self.context.eta_of(f, state.factors[layer]), load,
                self.context.selection.beta,
            )
        return curvature

    def _secant_scores(
        self, new: GlobalState, stats: FactorStats, curvature: dict[str, dict[str, float]]
    ) -> FactorStats:
        """Each factor's predicted decrease over the next round, at the new factors' sizes."""
        c = self.context
        return {
            layer: {
                f: secant_score(
                    v, c.eta_of(f, new.factors[layer]), c.tau, kappa(curvature.get(layer)), self._load(new, layer, f, v)
                )
                for f, v in factors.items()
            }
            for layer, factors in stats.items()
        }

    def weight(self, n_examples: int) -> int:
        uniform = self.official and self.context.selection.official_weights == "uniform"
        return 1 if uniform else n_examples  # the authors average without weights

    def describe(self, state: GlobalState) -> dict[str, Any]:
        """The round's mean statistics, raw scores and EMA scores per layer, for metrics.jsonl."""
        keys = ("stats", "scores", "ema", "curvature", "lead_sq")
        return {k: state.memory[k] for k in keys if k in state.memory}
