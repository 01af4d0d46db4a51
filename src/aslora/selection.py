"""AS-LoRA's factor selection (ALGORITHM.md section 4): statistics, score, EMA, decision.

The client side (`MomentTracker`) sees only the privatised gradient that
DP-SGD already released, so everything here is post-processing: no privacy
cost. The server side turns the clients' `G, Q, T` into a score per layer and
factor, smooths it, and decides which factor every layer trains next.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

FactorStats = dict[str, dict[str, dict[str, float]]]  # layer -> factor -> {"G", "Q", "T", "K"}
SCHEDULES = ("random", "always_b", "alternate")  # choices made without statistics


class MomentTracker:
    """Per-factor first and second moments of the privatised gradient over a round (4.1).

    `scales` multiply a factor's gradient before it is measured (and its noise
    variance by the square): a factor clipped to a smaller share of the budget
    (selection.score_clip_share) is seen as if clipped like the trained ones.
    """

    def __init__(
        self,
        factors: Mapping[tuple[str, str], torch.nn.Parameter],
        scales: Mapping[tuple[str, str], float] | None = None,
        secant: bool = False,
    ) -> None:
        self.factors = dict(factors)
        self.secant = secant  # also K, the secant curvature of consecutive steps (score 'secant')
        self.scales = {key: (scales or {}).get(key, 1.0) for key in self.factors}
        self.total = {key: torch.zeros_like(p, dtype=torch.float64) for key, p in self.factors.items()}
        self.total_sq = {key: torch.zeros_like(p, dtype=torch.float64) for key, p in self.factors.items()}
        self.last: dict[tuple[str, str], torch.Tensor] = {}  # the latest gradient (secant only)
        self.lag_cross = dict.fromkeys(self.factors, 0.0)  # sum of <g_t, g_{t+1}> (secant only)
        self.steps = 0

    @torch.no_grad()
    def observe(self) -> None:
        """Add this step's gradient (already clipped, noised and averaged by DP-SGD)."""
        for key, p in self.factors.items():
            if p.grad is None:
                raise RuntimeError(f"no gradient for {key}: every LoRA factor must be in the DP-SGD step")
            g = p.grad.detach().to(torch.float64) * self.scales[key]
            self.total[key] += g
            self.total_sq[key] += g * g
            if self.secant:
                if key in self.last:
                    self.lag_cross[key] += float((self.last[key] * g).sum())
                self.last[key] = g  # a fresh tensor: the product above
        self.steps += 1

    def statistics(self, nu: float) -> FactorStats:
        """G, Q, T (and K) per layer and factor, debiased by the per-coordinate noise variance `nu`."""
        stats: FactorStats = {}
        for (layer, factor), total in self.total.items():
            key, factor_nu = (layer, factor), nu * self.scales[(layer, factor)] ** 2
            values = moment_statistics(total / max(self.steps, 1), self.total_sq[key] / max(self.steps, 1), self.steps, factor_nu)
            if self.secant:  # sum of ||g_t||^2 over the steps that have a successor: all but the last
                last = float(self.last[key].square().sum()) if key in self.last else 0.0
                lag_sq = float(self.total_sq[key].sum()) - last
                values["K"] = secant_statistic(lag_sq, self.lag_cross[key], self.steps - 1, factor_nu * total.numel())
            stats.setdefault(layer, {})[factor] = values
        return stats


class LastStepTracker:
    """The official rule's client score: the last step's privatised gradient, projected.

    Keeps the final step's gradient of each trained factor and reports
    ||P g||^2 - dim(g) nu, floored at 0, where P is a fixed Gaussian random
    projection (the same on every client: seeded from the factor's name).
    """

    def __init__(self, factors: Mapping[tuple[str, str], torch.nn.Parameter], projection_dim: int = 256) -> None:
        self.factors = dict(factors)
        self.projection_dim = projection_dim
        self.last: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def observe(self) -> None:
        self.last = {key: p.grad.detach().to(torch.float64).flatten() for key, p in self.factors.items()}

    def statistics(self, nu: float) -> FactorStats:
        stats: FactorStats = {}
        for (layer, factor), g in self.last.items():
            projected = projection(f"{layer}.{factor}", g.numel(), self.projection_dim) @ g
            value = max(float((projected * projected).sum()) - g.numel() * nu, 0.0)
            stats.setdefault(layer, {})[factor] = {"S": value}
        return stats


def projection(name: str, dim: int, projection_dim: int) -> torch.Tensor:
    """A fixed Gaussian projection R^dim -> R^projection_dim with E||P g||^2 = ||g||^2."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(projection_dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(projection_dim)


def moment_statistics(m1: torch.Tensor, m2: torch.Tensor, steps: int, nu: float) -> dict[str, float]:
    """G = ||m1||^2 - nu dim / tau; F = max(m2 - nu, 0); Q = sum F m1^2; T = sum F.

    G is left unfloored, so that it stays an unbiased estimate of the squared
    mean gradient and a mean over clients and rounds averages its noise away;
    `floor_g` applies ALGORITHM.md 4.1's floor at 0 where a run asks for it.
    """
    if steps == 0:
        return {"G": 0.0, "Q": 0.0, "T": 0.0}
    fisher = torch.clamp(m2 - nu, min=0.0)
    g = float((m1 * m1).sum()) - nu * m1.numel() / steps
    return {"G": g, "Q": float((fisher * m1 * m1).sum()), "T": float(fisher.sum())}


def secant_statistic(lag_sq: float, lag_cross: float, pairs: int, noise: float) -> float:
    """K = mean over consecutive steps of (||g_t||^2 - noise) - <g_t, g_{t+1}>: about eta E[g^T H g].

    Why: after a step -eta g_t the gradient becomes g_t - eta H g_t plus fresh
    noise, so the drop of the privatised gradient along itself measures the
    curvature that the step met, DP noise included (E[g^T H g] = grad^T H grad
    + nu tr H). `noise` = nu dim removes the noise of ||g_t||^2. Only the
    trained factor's K means that (a frozen factor's gradient changes through
    the others); 0 without two steps. Post-processing of released gradients.
    """
    return (lag_sq - pairs * noise - lag_cross) / pairs if pairs > 0 else 0.0


def floor_g(stats: FactorStats) -> FactorStats:
    """One client's statistics with G floored at 0, as ALGORITHM.md 4.1 uploads it.

    Applied on the client (selection.floor_g), so that a secure sum of the
    clients' statistics stays the spec's mean. Why it is a choice: where the
    signal is below the noise of one client's round, max(G, 0) keeps the
    positive half of the noise, a bias of about its standard deviation that is
    alike for A and B of equal size; the score multiplies it by each factor's
    step size, so the decision then follows the lr ratio, not the data.
    Statistics without a G (the official rule's S) pass unchanged.
    """
    return {
        layer: {f: {**v, "G": max(v["G"], 0.0)} if "G" in v else v for f, v in factors.items()}
        for layer, factors in stats.items()
    }


def mean_statistics(per_client: Sequence[FactorStats], weights: Sequence[float]) -> FactorStats:
    """The weighted mean over clients of every G, Q, T."""
    mean: FactorStats = {}
    for layer, factors in per_client[0].items():
        for factor, values in factors.items():
            mean.setdefault(layer, {})[factor] = {
                k: float(sum(w * s[layer][factor][k] for s, w in zip(per_client, weights, strict=True)))
                for k in values
            }
    return mean


@dataclass(frozen=True)
class ScoreSettings:
    """What the score of 4.2 needs: step size, local steps, noise variance."""

    kind: str  # "curvature" or "first_order"
    eta: float
    tau: int
    nu: float


def score(stats: Mapping[str, float], settings: ScoreSettings, clients: int) -> float:
    """Predicted loss decrease of training this factor for one more round (4.2)."""
    eta_r = settings.eta * settings.tau
    first = eta_r * stats["G"]
    if settings.kind == "first_order":
        return first
    curvature = 0.5 * eta_r**2 * stats["Q"]
    smoothing = 0.5 * settings.eta**2 * (settings.tau * settings.nu / max(clients, 1)) * stats["T"]
    return first - curvature - smoothing


# The secant score (this project's; README "AS-LoRA's secant score") ------------------------------------
#
# Why: a step on A moves the weight by s B dA and a step on B by s dB A, so the DP noise a
# step puts into W, and the loss it costs, grows with the OTHER factor's size: A's noise with
# ||B||^2, B's with ||A||^2. The spec's Q and T come from batch-mean gradients and are far too
# small to see that. Here the weight-space curvature kappa of each layer (one number, shared by
# its two factors) is measured from the trained factor's secant K, and each factor is charged
# kappa times its own noise load.


def step_load(stats: Mapping[str, float], other_norm_sq: float, rank: int, nu: float, dim: int) -> float:
    """||other||^2 (G + nu dim) / r: E[g^T H g] of a step on this factor, per unit of weight-space curvature.

    With H_W = kappa I, a step g on A lands in W as s B g (and on B as s g A), whose expected
    squared norm is about ||other||^2 E||g||^2 / r for a factor whose r components are alike.
    """
    return other_norm_sq * (max(stats["G"], 0.0) + nu * dim) / rank


def update_curvature(
    memory: Mapping[str, float] | None, stats: Mapping[str, float], eta: float, load: float, beta: float
) -> dict[str, float]:
    """The layer's running sums for kappa: EMAs of K / eta (about E[g^T H g]) and of the load.

    kappa is their ratio, not an EMA of per-round ratios: a round whose load is near 0 (a step
    on A while B is still near 0) measures K of pure noise over a near-zero load, and must
    weigh little, not blow kappa up. The first measurement starts both EMAs.
    """
    measured = {"K": stats["K"] / eta, "load": load}
    if memory is None:
        return measured
    return {k: beta * memory[k] + (1 - beta) * v for k, v in measured.items()}


def kappa(memory: Mapping[str, float] | None) -> float:
    """The layer's weight-space curvature from its running sums (0 before any, never negative)."""
    if memory is None or memory["load"] <= 0:
        return 0.0
    return max(memory["K"], 0.0) / memory["load"]


def secant_score(stats: Mapping[str, float], eta: float, tau: int, curvature: float, load: float) -> float:
    """Predicted loss decrease of tau steps on this factor: tau (eta G - eta^2 kappa load / 2)."""
    return tau * (eta * stats["G"] - 0.5 * eta**2 * curvature * load)


def layer_groups(layers: Sequence[str], granularity: str, patterns: Sequence[str] = ()) -> list[list[str]]:
    """The units that decide together: each layer, all layers, or groups.

    `patterns` (for 'group'): regular expressions; a layer joins the first one
    it matches (re.search). 'block' and 'module' are shortcuts: one group per
    transformer block index, or per module name (query, value, ...).
    """
    if granularity == "layer":
        return [[layer] for layer in layers]
    if granularity == "tied":
        return [list(layers)]
    keys: dict[str, list[str]] = {}
    for layer in layers:
        keys.setdefault(_group_key(layer, patterns), []).append(layer)
    return list(keys.values())


def pinned_layers(layers: Sequence[str], patterns: Sequence[str]) -> frozenset[str]:
    """The layers that selection.pinned_b's patterns match (re.search); a pattern that matches no layer
    is an error, not a policy that silently alternates everywhere."""
    matched: set[str] = set()
    for pattern in patterns:
        hits = {layer for layer in layers if re.search(pattern, layer)}
        if not hits:
            raise ValueError(
                f"selection.pinned_b pattern {pattern!r} matches none of the adapted layers ({', '.join(layers)}); "
                "fix the pattern or remove it"
            )
        matched |= hits
    return frozenset(matched)


def _group_key(layer: str, patterns: Sequence[str]) -> str:
    if list(patterns) == ["block"]:
        found = re.search(r"\.(\d+)(?:\.|$)", layer)
        if found is None:
            raise ValueError(f"layer {layer} has no block index; use explicit selection.groups patterns")
        return found.group(1)
    if list(patterns) == ["module"]:
        return layer.rsplit(".", 1)[-1]
    for pattern in patterns:
        if re.search(pattern, layer):
            return pattern
    raise ValueError(
        f"layer {layer} matches none of selection.groups {list(patterns)}; add a pattern for it "
        "(regular expressions, or ['block'] / ['module'])"
    )


def group_score(ema: Mapping[str, Mapping[str, float]], group: Sequence[str], factor: str) -> float:
    """A unit's EMA score for `factor`: the sum over its layers (0 where a layer has none yet)."""
    return sum(ema.get(layer, {}).get(factor, 0.0) for layer in group)


def dwell(history: Sequence[Mapping[str, str]], layer: str) -> int:
    """How many of the latest rounds `layer` has trained its current factor."""
    if not history:
        return 0
    current, count = history[-1][layer], 0
    for mask in reversed(history):
        if mask[layer] != current:
            break
        count += 1
    return count


@dataclass(frozen=True)
class DecisionSettings:
    """The EMA decision of 4.3 and the switches of 4.4."""

    score: str
    groups: list[list[str]]
    hysteresis: float
    min_dwell: int
    warmup_rounds: int
    seed: int
    a_budget: float | None = None  # selection.a_budget: the share of units that train A each round
    confidence: float | None = None  # selection.confidence: the lead, in standard errors, that decides
    confident_factors: str = "AB"  # selection.confident_factors: which factors a sure lead may choose
    unsure: str = "alternate"  # selection.unsure: a unit's factor where the lead is not sure
    beta: float = 0.9  # the EMA's factor, which sets the standard error of an EMA lead
    pinned_b: frozenset[str] = frozenset()  # selection.pinned_b, resolved: layers that train B every round


def decide(
    round_index: int,
    settings: DecisionSettings,
    ema: Mapping[str, Mapping[str, float]],
    history: Sequence[Mapping[str, str]],
    lead_sq: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """The factor every layer trains in `round_index`.

    Round 0 and warm-up rounds train B. Fixed schedules ignore the scores.
    Otherwise each unit (layer, all layers, or group) compares its summed EMA
    scores and switches only if the other factor beats the current one by the
    hysteresis margin and the current one has been active `min_dwell` rounds;
    ties keep the current factor.
    """
    layers = [layer for group in settings.groups for layer in group]
    if round_index == 0 or round_index < settings.warmup_rounds or settings.score == "always_b":
        return dict.fromkeys(layers, "B")
    if settings.score == "alternate":
        factor = "B" if round_index % 2 == 0 else "A"
        return {layer: "B" if layer in settings.pinned_b else factor for layer in layers}
    if settings.score == "random":
        rng = np.random.default_rng([settings.seed, round_index])
        coins = rng.integers(0, 2, size=len(settings.groups))
        return {layer: "AB"[int(c)] for group, c in zip(settings.groups, coins, strict=True) for layer in group}
    if settings.a_budget is not None:
        return decide_budget(settings.groups, ema, settings.a_budget)
    if settings.confidence is not None:
        return decide_confident(settings, ema, history, lead_sq or {})
    previous = history[-1] if history else dict.fromkeys(layers, "B")
    mask = {}
    for group in settings.groups:
        current = previous[group[0]]
        other = "A" if current == "B" else "B"
        s_current, s_other = group_score(ema, group, current), group_score(ema, group, other)
        switch = (
            s_other > s_current + settings.hysteresis * abs(s_current)
            and dwell(history, group[0]) >= settings.min_dwell
        )
        mask.update(dict.fromkeys(group, other if switch else current))
    return mask


def decide_budget(groups: Sequence[Sequence[str]], ema: Mapping[str, Mapping[str, float]], budget: float) -> dict[str, str]:
    """A joint decision under a per-round budget of A-units (the paper's future work).

    Why: the greedy rule of 4.3 compares A with B unit by unit, so wherever the
    scores are noisy or favour one factor everywhere (B, whose step size is the
    larger under LoRA+) it trains that factor on every layer and becomes
    FFA-LoRA. Here round(budget * units) units train A each round, those where
    A's summed EMA score leads B's by the most (ties: the earlier unit); the
    scores place the A-steps, the budget sets how many there are.
    """
    count = round(budget * len(groups))
    lead = [group_score(ema, group, "A") - group_score(ema, group, "B") for group in groups]
    chosen = set(sorted(range(len(groups)), key=lambda i: -lead[i])[:count])
    return {layer: "A" if i in chosen else "B" for i, group in enumerate(groups) for layer in group}


def unit_lead(scores: Mapping[str, Mapping[str, float]], group: Sequence[str]) -> float:
    """How far A's score leads B's over a unit's layers (negative: B leads)."""
    return group_score(scores, group, "A") - group_score(scores, group, "B")


def update_lead_sq(
    lead_sq: Mapping[str, float], scores: Mapping[str, Mapping[str, float]], groups: Sequence[Sequence[str]], beta: float
) -> dict[str, float]:
    """Each unit's EMA of its squared per-round lead (keyed by its first layer): the spread that
    selection.confidence measures the EMA lead against."""
    new = dict(lead_sq)
    for group in groups:
        new[group[0]] = beta * new.get(group[0], 0.0) + (1 - beta) * unit_lead(scores, group) ** 2
    return new


def decide_confident(
    settings: DecisionSettings,
    ema: Mapping[str, Mapping[str, float]],
    history: Sequence[Mapping[str, str]],
    lead_sq: Mapping[str, float],
) -> dict[str, str]:
    """The score decides where it is sure; elsewhere the unit alternates (selection.confidence).

    Why: under DP a unit's per-round scores are often noise around a lead of 0, and the greedy
    rule of 4.3 then trains whichever factor the noise favours, for many rounds; a factor
    trained while its partner is near 0 moves by noise alone. Alternation (RoLoRA) is the exact
    schedule that needs no statistics, so it is the default here, and a unit leaves it only for
    the factor whose EMA lead exceeds `confidence` standard errors. The standard error of an EMA
    of per-round leads of second moment m2 is sqrt(m2 (1 - beta) / (1 + beta)) (the uncentred
    moment: conservative). With `confident_factors` "B" a sure lead for A alternates too: a
    one-round score cannot see that a run of steps on A, made while B is small, grows A to make
    up for B, and that every later step on B then puts ||A||^2 times more noise into the weight
    (synthetic recovery: such layers end imbalanced and above RoLoRA's floor; README). With
    `unsure` "B" an unsure unit trains B, as FFA-LoRA does, and A trains only on a sure lead.
    """
    previous = history[-1] if history else {}
    shrink = (1 - settings.beta) / (1 + settings.beta)
    mask = {}
    for group in settings.groups:
        lead = group_score(ema, group, "A") - max(group_score(ema, group, "B"), 0.0)
        margin = settings.confidence * math.sqrt(lead_sq.get(group[0], 0.0) * shrink)
        alternate = "A" if previous.get(group[0], "A") == "B" else "B"
        if lead < -margin or (lead > margin and "A" in settings.confident_factors):
            factor = "A" if lead > 0 else "B"
        elif lead > margin or settings.unsure == "alternate":
            factor = alternate
        else:
            factor = "B"
        mask.update(dict.fromkeys(group, factor))
    return mask


# The authors' rule (ALGORITHM.md section 7) ------------------------------------


def official_warmup(rounds: int) -> int:
    """The first 10 % of rounds (rounded up) follow the layer-tied B, A, B, ... schedule."""
    return math.ceil(0.1 * rounds)


def official_temperature(round_index: int, warmup: int) -> float:
    """T_r = max(0.1, 0.95^(r - warmup))."""
    return max(0.1, 0.95 ** (round_index - warmup))


def official_probability_a(s_a: float, s_b: float, temperature: float) -> float:
    """p_A = sigmoid(d / T), d = (S_A - S_B) / (|S_A| + |S_B| + 1e-8)."""
    d = (s_a - s_b) / (abs(s_a) + abs(s_b) + 1e-8)
    return 1.0 / (1.0 + math.exp(-d / temperature))


def decide_official(
    round_index: int,
    groups: Sequence[Sequence[str]],
    ema: Mapping[str, Mapping[str, float]],
    warmup: int,
    seed: int,
) -> dict[str, str]:
    """Warm-up alternation, then a seeded sigmoid draw per unit from its summed EMA scores."""
    if round_index < warmup:
        factor = "B" if round_index % 2 == 0 else "A"
        return {layer: factor for group in groups for layer in group}
    temperature = official_temperature(round_index, warmup)
    draws = np.random.default_rng([seed, round_index]).random(len(groups))
    mask = {}
    for group, u in zip(groups, draws, strict=True):
        s_a, s_b = group_score(ema, group, "A"), group_score(ema, group, "B")
        mask.update(dict.fromkeys(group, "A" if u < official_probability_a(s_a, s_b, temperature) else "B"))
    return mask


def update_ema(
    ema: Mapping[str, Mapping[str, float]], scores: Mapping[str, Mapping[str, float]], beta: float
) -> dict[str, dict[str, float]]:
    """S(t) = beta S(t-1) + (1 - beta) s(t) for every scored layer and factor (S(-1) = 0).

    Factors without a score this round keep their EMA: the official rule
    scores only the active factor; the spec rule scores both.
    """
    new = {layer: dict(factors) for layer, factors in ema.items()}
    for layer, factors in scores.items():
        for factor, value in factors.items():
            old = new.setdefault(layer, {}).get(factor, 0.0)
            new[layer][factor] = beta * old + (1 - beta) * value
    return new
