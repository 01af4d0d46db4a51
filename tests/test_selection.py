"""AS-LoRA's statistics, score and decisions (ALGORITHM.md section 4), without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aslora.config import SelectionConfig
from aslora.methods import get_method
from aslora.methods.base import MethodContext, aggregation_error, average_trained_factors
from aslora.protocol import ClientUpdate, GlobalState
from aslora.selection import (
    DecisionSettings,
    LastStepTracker,
    MomentTracker,
    ScoreSettings,
    decide,
    decide_official,
    floor_g,
    layer_groups,
    mean_statistics,
    moment_statistics,
    official_probability_a,
    official_temperature,
    official_warmup,
    pinned_layers,
    score,
    update_curvature,
    update_ema,
    update_lead_sq,
)
from aslora.selection import kappa as secant_kappa
from aslora.server import value_problem

LAYERS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(3) for m in ("query", "value")]


def test_quadratic_statistics_and_score_match_the_closed_form() -> None:
    """SGD on L(x) = 0.5 sum h (x - x*)^2: gradients are h (1 - eta h)^t (x0 - x*) in closed form."""
    rng = np.random.default_rng(0)
    h = rng.uniform(0.1, 2.0, size=(3, 4))
    x0, target = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    eta, tau = 0.1, 5
    x = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    tracker = MomentTracker({("layer", "A"): x})
    optimizer = torch.optim.SGD([x], lr=eta)
    for _ in range(tau):
        optimizer.zero_grad()
        (0.5 * (torch.tensor(h) * (x - torch.tensor(target)) ** 2).sum()).backward()
        tracker.observe()
        optimizer.step()
    grads = [h * (1 - eta * h) ** t * (x0 - target) for t in range(tau)]
    m1, m2 = np.mean(grads, axis=0), np.mean([g * g for g in grads], axis=0)
    expected = {"G": (m1**2).sum(), "Q": (m2 * m1**2).sum(), "T": m2.sum()}
    stats = tracker.statistics(nu=0.0)["layer"]["A"]
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-10)
    nu, m = 1e-3, 4
    settings = ScoreSettings("curvature", eta=eta, tau=tau, nu=nu)
    eta_r = eta * tau
    closed = eta_r * expected["G"] - 0.5 * eta_r**2 * expected["Q"] - 0.5 * eta**2 * tau * nu / m * expected["T"]
    assert score(stats, settings, clients=m) == pytest.approx(closed, rel=1e-10)
    assert score(stats, ScoreSettings("first_order", eta, tau, nu), m) == pytest.approx(eta_r * expected["G"])


def test_a_scaled_factor_is_measured_as_if_clipped_like_the_trained_ones() -> None:
    """selection.score_clip_share: a factor clipped to C sqrt(s) is scaled by k = sqrt((1 - s) / s),
    its noise variance by k^2; pure noise at that scale still debiases to G about 0."""
    rng = np.random.default_rng(2)
    nu, tau, dim, k = 0.1, 5, 2000, 3.0
    x = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    signal = torch.tensor(rng.normal(size=dim))
    tracker = MomentTracker({("layer", "A"): x}, {("layer", "A"): k})
    for _ in range(tau):
        x.grad = signal / k + torch.tensor(rng.normal(scale=np.sqrt(nu), size=dim))
        tracker.observe()
    stats = tracker.statistics(nu)["layer"]["A"]
    assert stats["G"] == pytest.approx(float((signal**2).sum()), rel=0.05)  # the signal at the trained scale


def test_debiasing_removes_the_noise_from_g_and_the_fisher() -> None:
    """Pure-noise gradients: raw ||m1||^2 averages nu dim / tau; debiased G averages about 0."""
    rng = np.random.default_rng(1)
    nu, tau, dim = 0.04, 5, 2000
    raw, debiased, traces = [], [], []
    for _ in range(200):
        g = rng.normal(scale=np.sqrt(nu), size=(tau, dim))
        m1, m2 = torch.tensor(g.mean(0)), torch.tensor((g * g).mean(0))
        stats = moment_statistics(m1, m2, tau, nu)
        raw.append(float((m1 * m1).sum()))
        debiased.append(stats["G"])
        traces.append(stats["T"])
    bias = nu * dim / tau
    assert np.mean(raw) == pytest.approx(bias, rel=0.02)
    assert abs(np.mean(debiased)) < 0.02 * bias  # unbiased: the noise averages out ...
    assert min(debiased) < 0 < max(debiased)  # ... because G is not floored on the client
    floored = [floor_g({"l": {"A": {"G": g, "Q": 0.0, "T": 0.0}}})["l"]["A"]["G"] for g in debiased]
    spread = float(np.std(debiased))
    assert np.mean(floored) > 0.3 * spread  # ALGORITHM.md 4.1's floor keeps the positive half of the noise
    raw_trace = nu * dim
    assert np.mean(traces) < 0.3 * raw_trace  # clamped at 0: only the positive noise excess remains


def test_mean_statistics_are_weighted() -> None:
    a = {"l": {"A": {"G": 1.0, "Q": 2.0, "T": 3.0}}}
    b = {"l": {"A": {"G": 3.0, "Q": 6.0, "T": 9.0}}}
    assert mean_statistics([a, b], [0.25, 0.75])["l"]["A"] == {"G": 2.5, "Q": 5.0, "T": 7.5}


def _settings(score_kind: str = "curvature", granularity: str = "layer", groups=("block",), **kw) -> DecisionSettings:
    return DecisionSettings(
        score=score_kind,
        groups=layer_groups(LAYERS, granularity, groups),
        hysteresis=kw.get("hysteresis", 0.0),
        min_dwell=kw.get("min_dwell", 1),
        warmup_rounds=kw.get("warmup_rounds", 0),
        seed=0,
        a_budget=kw.get("a_budget"),
        confidence=kw.get("confidence"),
        confident_factors=kw.get("confident_factors", "AB"),
        unsure=kw.get("unsure", "alternate"),
        beta=kw.get("beta", 0.9),
        pinned_b=kw.get("pinned_b", frozenset()),
    )


def _ema(prefer_a: set[str], gap: float = 1.0) -> dict[str, dict[str, float]]:
    return {layer: {"A": gap if layer in prefer_a else 0.0, "B": 0.0 if layer in prefer_a else gap} for layer in LAYERS}


def test_round_zero_and_warmup_train_b_everywhere() -> None:
    ema = _ema(set(LAYERS))
    assert set(decide(0, _settings(), ema, []).values()) == {"B"}
    history = [dict.fromkeys(LAYERS, "B")]
    assert set(decide(1, _settings(warmup_rounds=2), ema, history).values()) == {"B"}
    assert set(decide(2, _settings(warmup_rounds=2), ema, history * 2).values()) == {"A"}


def test_layerwise_decision_follows_the_ema() -> None:
    prefer_a = {LAYERS[0], LAYERS[3]}
    mask = decide(1, _settings(), _ema(prefer_a), [dict.fromkeys(LAYERS, "B")])
    assert {layer for layer, f in mask.items() if f == "A"} == prefer_a


def test_ties_keep_the_current_factor() -> None:
    tie = {layer: {"A": 1.0, "B": 1.0} for layer in LAYERS}
    previous = {layer: "A" if i % 2 else "B" for i, layer in enumerate(LAYERS)}
    assert decide(3, _settings(), tie, [previous]) == previous


def test_hysteresis_and_minimum_dwell() -> None:
    ema = {layer: {"A": 1.05, "B": 1.0} for layer in LAYERS}  # A better by 5 %
    history = [dict.fromkeys(LAYERS, "B")]
    assert set(decide(1, _settings(hysteresis=0.1), ema, history).values()) == {"B"}
    assert set(decide(1, _settings(hysteresis=0.01), ema, history).values()) == {"A"}
    assert set(decide(1, _settings(min_dwell=2), ema, history).values()) == {"B"}
    assert set(decide(2, _settings(min_dwell=2), ema, history * 2).values()) == {"A"}


def test_tied_gives_one_factor_to_all_layers_from_summed_scores() -> None:
    ema = _ema({LAYERS[0]}, gap=10.0)  # one layer strongly prefers A, five mildly prefer B
    ema.update({layer: {"A": 0.0, "B": 1.0} for layer in LAYERS[1:]})
    mask = decide(1, _settings(granularity="tied"), ema, [dict.fromkeys(LAYERS, "B")])
    assert set(mask.values()) == {"A"}  # 10 > 5


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        (("block",), [[LAYERS[0], LAYERS[1]], [LAYERS[2], LAYERS[3]], [LAYERS[4], LAYERS[5]]]),
        (("module",), [LAYERS[0::2], LAYERS[1::2]]),
        ((r"layer\.0\.", r"layer\.[12]\."), [LAYERS[:2], LAYERS[2:]]),
    ],
)
def test_group_granularity_decides_per_group(groups: tuple[str, ...], expected: list[list[str]]) -> None:
    assert layer_groups(LAYERS, "group", groups) == expected
    ema = _ema(set(expected[0]))
    mask = decide(1, _settings(granularity="group", groups=groups), ema, [dict.fromkeys(LAYERS, "B")])
    for i, group in enumerate(expected):
        assert {mask[layer] for layer in group} == ({"A"} if i == 0 else {"B"})


def test_a_numbered_layer_is_its_own_block() -> None:
    """Layers named '...layers.3' (the synthetic task's) have a block index at the end of the name."""
    layers = [f"base_model.model.layers.{i}" for i in range(3)]
    assert layer_groups(layers, "group", ["block"]) == [[layer] for layer in layers]
    with pytest.raises(ValueError, match="has no block index"):
        layer_groups(["classifier"], "group", ["block"])


def test_group_patterns_must_cover_every_layer() -> None:
    with pytest.raises(ValueError, match="matches none of selection.groups"):
        layer_groups(LAYERS, "group", [r"layer\.0\."])


def test_schedules() -> None:
    history = [dict.fromkeys(LAYERS, "B")]
    for r in range(6):
        assert set(decide(r, _settings("always_b"), {}, history).values()) == {"B"}
        assert set(decide(r, _settings("alternate"), {}, history).values()) == {"B" if r % 2 == 0 else "A"}
    draws = [decide(r, _settings("random"), {}, history) for r in range(1, 40)]
    assert draws == [decide(r, _settings("random"), {}, history) for r in range(1, 40)]  # seeded
    share_a = np.mean([f == "A" for d in draws for f in d.values()])
    assert 0.35 < share_a < 0.65


def test_ema_update() -> None:
    ema = update_ema({}, {"l": {"A": 1.0, "B": 2.0}}, beta=0.9)
    assert ema["l"]["A"] == pytest.approx(0.1) and ema["l"]["B"] == pytest.approx(0.2)
    ema = update_ema(ema, {"l": {"A": 1.0, "B": 0.0}}, beta=0.9)
    assert ema["l"]["A"] == pytest.approx(0.19) and ema["l"]["B"] == pytest.approx(0.18)


def test_aggregation_is_exact_for_every_mask() -> None:
    gen = torch.Generator().manual_seed(0)
    layers = {f"l{i}": (8 + i, 6 + 2 * i) for i in range(4)}
    for code in range(16):  # every A/B assignment of four layers
        mask = {name: "A" if code >> i & 1 else "B" for i, name in enumerate(layers)}
        state = GlobalState(
            factors={n: {"A": torch.randn(2, k, generator=gen), "B": torch.randn(d, 2, generator=gen)} for n, (d, k) in layers.items()},
            head={}, scaling=dict.fromkeys(layers, 2.0),
        )
        updates = [
            ClientUpdate(i, 10 + i, {n: {f: state.factors[n][f] + torch.randn(state.factors[n][f].shape, generator=gen)} for n, f in mask.items()}, {}, 0.0, 0)
            for i in range(3)
        ]
        weights = [u.n_examples / sum(v.n_examples for v in updates) for u in updates]
        new = average_trained_factors(state, updates, weights)
        assert max(aggregation_error(state, updates, weights, state.evolve(factors=new)).values()) < 1e-6


# The authors' rule (ALGORITHM.md section 7) --------------------------------------


def test_official_temperature_and_draw_probability_on_hand_computed_scores() -> None:
    assert official_warmup(100) == 10 and official_warmup(8) == 1
    assert official_temperature(10, 10) == 1.0
    assert official_temperature(20, 10) == pytest.approx(0.95**10)
    assert official_temperature(80, 10) == 0.1  # 0.95^70 = 0.028, floored
    # S_A = 3, S_B = 1: d = 2 / 4 = 0.5
    assert official_probability_a(3.0, 1.0, 1.0) == pytest.approx(1 / (1 + np.exp(-0.5)))
    assert official_probability_a(3.0, 1.0, 0.95**10) == pytest.approx(1 / (1 + np.exp(-0.5 / 0.95**10)))
    assert official_probability_a(3.0, 1.0, 0.1) == pytest.approx(1 / (1 + np.exp(-5.0)))
    assert official_probability_a(-1.0, 1.0, 1.0) == pytest.approx(1 / (1 + np.exp(1.0)))  # d = -1
    assert official_probability_a(0.0, 0.0, 1.0) == 0.5


def test_official_decision_warms_up_then_draws_with_that_probability() -> None:
    groups = [[f"l{i}"] for i in range(4000)]
    assert {f for r in range(3) for f in decide_official(r, groups, {}, 3, 0).values()} == {"A", "B"}
    assert set(decide_official(1, groups, {}, 3, 0).values()) == {"A"}  # B, A, B while warming up
    ema = {g[0]: {"A": 3.0, "B": 1.0} for g in groups}
    mask = decide_official(13, groups, ema, 3, 0)  # T = 0.95^10
    expected = official_probability_a(3.0, 1.0, official_temperature(13, 3))
    assert np.mean([f == "A" for f in mask.values()]) == pytest.approx(expected, abs=0.025)
    assert mask == decide_official(13, groups, ema, 3, 0)  # seeded


def test_official_ema_moves_only_the_active_factor() -> None:
    ema = {"l": {"A": 1.0, "B": 2.0}}
    new = update_ema(ema, {"l": {"B": 4.0}}, beta=0.9)
    assert new["l"] == {"A": 1.0, "B": pytest.approx(2.2)}
    assert ema["l"]["B"] == 2.0  # not mutated


def test_last_step_score_is_a_debiased_projected_norm() -> None:
    g = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(8, 64, dtype=torch.float64))
    p.grad = g.clone()
    tracker = LastStepTracker({("l", "B"): p}, projection_dim=4096)
    tracker.observe()
    raw = tracker.statistics(nu=0.0)["l"]["B"]["S"]
    assert raw == pytest.approx(float((g * g).sum()), rel=0.1)  # Johnson-Lindenstrauss
    nu = 1e-3
    assert tracker.statistics(nu)["l"]["B"]["S"] == pytest.approx(raw - 512 * nu)
    assert tracker.statistics(nu=10.0)["l"]["B"]["S"] == 0.0  # floored


@pytest.mark.parametrize(
    ("stats", "rejected"),
    [({"G": -0.5, "Q": 0.0, "T": 0.0}, False), ({"G": 0.5, "Q": -0.5, "T": 0.0}, True),
     ({"G": 0.5, "Q": 0.0, "T": 0.0, "K": -0.5}, False),
     ({"G": float("nan"), "Q": 0.0, "T": 0.0}, True), ({"G": 0.0, "Q": 0.0, "T": float("inf")}, True)],
)
def test_the_server_accepts_a_negative_g_or_k_but_no_other_negative_or_non_finite_statistic(
    stats: dict[str, float], rejected: bool
) -> None:
    update = ClientUpdate(
        client_id=0, n_examples=1, factors={}, head={}, examples_seen=1, stats={"l": {"A": stats}}
    )
    assert (value_problem(update) is not None) == rejected


def test_the_budget_rule_trains_a_where_it_leads_b_the_most_and_on_exactly_its_share() -> None:
    """selection.a_budget: round(share * units) units train A, ranked by S_A - S_B, even where B
    leads everywhere (the greedy rule would train B on every layer there)."""
    leads = [0.3, -1.0, 0.5, 0.1, -0.2, -3.0]
    ema = {layer: {"A": lead, "B": 0.0} for layer, lead in zip(LAYERS, leads, strict=True)}
    history = [dict.fromkeys(LAYERS, "B")]
    mask = decide(1, _settings(a_budget=0.5), ema, history)
    assert [layer for layer in LAYERS if mask[layer] == "A"] == [LAYERS[0], LAYERS[2], LAYERS[3]]
    behind = {layer: {"A": lead - 10.0, "B": 0.0} for layer, lead in zip(LAYERS, leads, strict=True)}
    assert set(decide(1, _settings(), behind, history).values()) == {"B"}
    budget = decide(1, _settings(a_budget=1 / 3), behind, history)
    assert [layer for layer in LAYERS if budget[layer] == "A"] == [LAYERS[0], LAYERS[2]]
    by_block = decide(1, _settings(granularity="group", a_budget=1 / 3), ema, history)  # blocks sum q and v
    assert [layer for layer in LAYERS if by_block[layer] == "A"] == LAYERS[2:4]
    assert set(decide(0, _settings(a_budget=0.5), ema, []).values()) == {"B"}  # round 0: A's score is 0


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"a_budget": 0.5, "score": "random"}, "score 'random'"), ({"a_budget": 0.5, "rule": "official"}, "rule 'official'"),
     ({"a_budget": 0.5, "hysteresis": 0.1}, "hysteresis"), ({"a_budget": 0.0}, "a_budget"),
     ({"ema_from": "frozen", "rule": "official"}, "ema_from"), ({"floor_g": False, "score": "alternate"}, "floor_g"),
     ({"confident_factors": "B"}, "set selection.confidence"), ({"confident_factors": "A"}, "confident_factors"),
     ({"unsure": "B"}, "set selection.confidence"), ({"unsure": "A", "confidence": 0.5}, "unsure"),
     ({"pinned_b": ["value"]}, "score 'alternate'"), ({"pinned_b": ["value"], "score": "random"}, "pinned_b"),
     ({"pinned_b": ["value("], "score": "alternate"}, "not a regular expression"),
     ({"pinned_b": "value", "score": "alternate"}, "pinned_b")],
)
def test_a_selection_setting_that_would_do_nothing_is_a_config_error(overrides: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        SelectionConfig(**overrides)


def test_pinned_layers_train_b_every_round_and_the_rest_alternate() -> None:
    """selection.pinned_b: a fixed per-layer policy over the 'alternate' schedule (the hindsight baseline)."""
    values = {layer for layer in LAYERS if layer.endswith("value")}
    settings = _settings("alternate", pinned_b=pinned_layers(LAYERS, ["value$"]))
    masks = [decide(r, settings, {}, []) for r in range(4)]
    for r, mask in enumerate(masks):
        assert {layer for layer, f in mask.items() if f == "B"} >= values
        assert {mask[layer] for layer in set(LAYERS) - values} == {"B" if r % 2 == 0 else "A"}
    plain = [decide(r, _settings("alternate"), {}, []) for r in range(2)]
    assert set(plain[1].values()) == {"A"}  # without pins: RoLoRA's schedule


def test_a_pinned_b_pattern_that_matches_no_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match="matches none of the adapted layers"):
        pinned_layers(LAYERS, ["value$", "dense"])


def test_aslora_with_pinned_b_plans_the_fixed_policy() -> None:
    """Through the method: the config's patterns resolve against the state's layers."""
    state = GlobalState(factors={layer: {} for layer in LAYERS}, head={}, scaling={})
    context = MethodContext(
        selection=SelectionConfig(score="alternate", pinned_b=["query"]), eta=1.0, tau=1, nu=0.0, seed=0, rounds=4
    )
    mask = get_method("aslora", context).plan(1, state)
    assert {layer: f for layer, (f,) in mask.items()} == {
        layer: "B" if layer.endswith("query") else "A" for layer in LAYERS
    }


def test_ema_from_frozen_moves_only_the_ema_of_the_factor_that_did_not_train() -> None:
    """selection.ema_from = 'frozen': the trained factor's statistics were measured while it moved,
    so only the frozen factor's score enters its EMA; 'all' (4.3) moves both."""
    state = GlobalState(
        factors={"l": {"A": torch.zeros(2, 3), "B": torch.zeros(3, 2)}}, head={}, scaling={"l": 1.0},
        memory={"ema": {"l": {"A": 0.5, "B": 0.5}}},
    )
    update = ClientUpdate(
        client_id=0, n_examples=10, factors={"l": {"B": torch.zeros(3, 2)}}, head={}, examples_seen=10,
        stats={"l": {"A": {"G": 2.0, "Q": 0.0, "T": 0.0}, "B": {"G": 4.0, "Q": 0.0, "T": 0.0}}},
    )
    emas = {}
    for source in ("all", "frozen"):
        context = MethodContext(
            selection=SelectionConfig(ema_from=source, beta=0.5, score="first_order"), eta=1.0, tau=1, nu=0.0,
            seed=0, rounds=2,
        )
        emas[source] = get_method("aslora", context).aggregate(state, [update], [1.0]).memory["ema"]["l"]
    assert emas == {"all": {"A": 1.25, "B": 2.25}, "frozen": {"A": 1.25, "B": 0.5}}


def test_the_secant_measures_the_curvature_that_noisy_steps_meet() -> None:
    """Noisy SGD on L(x) = 0.5 sum h x^2: K / eta estimates E[g^T H g] = sum h (grad^2 + nu), DP noise
    included; started at the minimum, where the noise alone meets the curvature (nu sum h), it
    doubles with h; a factor that does not move shows no such drop."""
    rng = np.random.default_rng(3)
    nu, eta, steps, dim = 0.01, 0.05, 40, 4000
    measured = {}
    for scale, start in ((1.0, 0.1), (1.0, 0.0), (2.0, 0.0)):
        h = torch.tensor(rng.uniform(0.5, 1.5, size=dim)) * scale
        x = torch.nn.Parameter(torch.tensor(rng.normal(scale=start, size=dim)))
        tracker = MomentTracker({("layer", "A"): x}, secant=True)
        expected = []
        for _ in range(steps):
            x.grad = h * x.detach() + torch.tensor(rng.normal(scale=np.sqrt(nu), size=dim))
            expected.append(float((h * x.grad * x.grad).sum()))
            tracker.observe()
            with torch.no_grad():
                x -= eta * x.grad
        measured[scale, start] = tracker.statistics(nu)["layer"]["A"]["K"] / eta
        assert measured[scale, start] == pytest.approx(np.mean(expected[:-1]), rel=0.1)
    assert measured[2.0, 0.0] / measured[1.0, 0.0] == pytest.approx(2.0, rel=0.15)
    still = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    frozen = MomentTracker({("layer", "B"): still}, secant=True)
    for _ in range(steps):
        still.grad = torch.tensor(rng.normal(scale=np.sqrt(nu), size=dim))
        frozen.observe()
    assert abs(frozen.statistics(nu)["layer"]["B"]["K"]) < 0.2 * measured[1.0, 0.0] * eta  # noise only
    assert "K" not in MomentTracker({("layer", "B"): still}).statistics(nu)["layer"]["B"]  # only where asked


def test_the_secant_score_charges_a_step_on_a_with_the_size_of_b() -> None:
    """The layer's curvature kappa comes from the trained factor's K; each factor is then charged
    kappa times its step load, ||partner||^2 (G + nu dim) / r: the same statistics score A lower
    as B grows, and B is unaffected."""
    nu, eta, tau, rank = 1e-3, 0.5, 4, 2
    context = MethodContext(
        selection=SelectionConfig(score="secant", floor_g=False, beta=0.5), eta=eta, tau=tau, nu=nu, seed=0, rounds=4
    )
    method = get_method("aslora", context)
    stats = {"A": {"G": 1.0, "Q": 0.0, "T": 0.0, "K": 0.0}, "B": {"G": 1.0, "Q": 0.0, "T": 0.0, "K": 0.3}}
    scores = {}
    for b_size in (0.5, 2.0):
        a, b = torch.full((rank, 3), 0.5), torch.full((4, rank), b_size)
        state = GlobalState(factors={"l": {"A": a, "B": b}}, head={}, scaling={"l": 1.0})
        update = ClientUpdate(
            client_id=0, n_examples=10, factors={"l": {"B": b}}, head={}, examples_seen=10, stats={"l": stats}
        )
        memory = method.aggregate(state, [update], [1.0]).memory
        load_b = float(a.square().sum()) * (1.0 + nu * b.numel()) / rank
        kappa = 0.3 / (eta * load_b)
        assert secant_kappa(memory["curvature"]["l"]) == pytest.approx(kappa)
        load_a = float(b.square().sum()) * (1.0 + nu * a.numel()) / rank
        assert memory["scores"]["l"]["A"] == pytest.approx(tau * (eta - 0.5 * eta**2 * kappa * load_a))
        assert memory["scores"]["l"]["B"] == pytest.approx(tau * (eta - 0.5 * eta**2 * kappa * load_b))
        scores[b_size] = memory["scores"]["l"]
    assert scores[2.0]["A"] < scores[0.5]["A"] and scores[2.0]["B"] == pytest.approx(scores[0.5]["B"])


def test_kappa_weighs_each_round_by_its_load() -> None:
    """kappa is the ratio of the EMAs of K / eta and of the load: a round of pure noise over a
    near-zero load (a step on A while B is about 0) barely moves it, where an EMA of per-round
    ratios would jump by (1 - beta) * 0.01 / 1e-6."""
    memory = update_curvature(None, {"K": 2.0}, eta=1.0, load=1.0, beta=0.9)
    assert secant_kappa(memory) == pytest.approx(2.0)
    memory = update_curvature(memory, {"K": 0.01}, eta=1.0, load=1e-6, beta=0.9)
    assert secant_kappa(memory) == pytest.approx((0.9 * 2.0 + 0.1 * 0.01) / (0.9 + 0.1e-6))
    assert secant_kappa(update_curvature(None, {"K": -1.0}, eta=1.0, load=1.0, beta=0.9)) == 0.0
    assert secant_kappa(None) == 0.0


def test_the_confident_rule_alternates_where_the_lead_is_within_its_noise() -> None:
    """selection.confidence = z: a unit whose EMA lead exceeds z standard errors trains the factor
    that leads; the others alternate from the factor they trained last."""
    settings = _settings(confidence=2.0, beta=0.9)
    shrink = (1 - 0.9) / (1 + 0.9)
    leads = [0.5, -0.5, 0.05, -0.05, 0.0, 0.5]
    ema = {layer: {"A": lead, "B": 0.0} for layer, lead in zip(LAYERS, leads, strict=True)}
    # per-round leads of second moment 1.0: the EMA's standard error is sqrt(shrink) = 0.229
    lead_sq = dict.fromkeys(LAYERS, 1.0)
    history = [dict.fromkeys(LAYERS, "A")]
    mask = decide(3, settings, ema, history, lead_sq)
    assert 2.0 * np.sqrt(shrink) < 0.5
    assert [mask[layer] for layer in LAYERS] == ["A", "B", "B", "B", "B", "A"]  # within the noise: A -> B
    quiet = decide(3, settings, ema, history, dict.fromkeys(LAYERS, 1e-6))  # the same leads, now sure
    assert [quiet[layer] for layer in LAYERS] == ["A", "B", "A", "B", "B", "A"]


def test_a_b_only_confidence_leaves_a_to_alternation() -> None:
    """confident_factors 'B': a sure lead for B still pins the unit to B, a sure lead for A does not."""
    leads = [0.5, -0.5, 0.5, -0.5, 0.5, -0.5]
    ema = {layer: {"A": lead, "B": 0.0} for layer, lead in zip(LAYERS, leads, strict=True)}
    sure = dict.fromkeys(LAYERS, 1e-6)
    after_b, after_a = [dict.fromkeys(LAYERS, "B")], [dict.fromkeys(LAYERS, "A")]
    both = _settings(confidence=0.5, beta=0.9)
    only_b = _settings(confidence=0.5, beta=0.9, confident_factors="B")
    assert [decide(3, both, ema, after_a, sure)[layer] for layer in LAYERS] == ["A", "B"] * 3
    assert [decide(3, only_b, ema, after_a, sure)[layer] for layer in LAYERS] == ["B", "B"] * 3  # A -> B
    assert [decide(3, only_b, ema, after_b, sure)[layer] for layer in LAYERS] == ["A", "B"] * 3  # B -> A


def test_an_unsure_unit_trains_b_with_unsure_b() -> None:
    """selection.unsure 'B': where the lead is within the margin the unit trains B, not the factor it
    skipped last round; sure leads decide as before (for A, by alternation under confident_factors 'B')."""
    leads = [0.5, -0.5, 0.0, 0.0, 0.5, -0.5]
    ema = {layer: {"A": lead, "B": 0.0} for layer, lead in zip(LAYERS, leads, strict=True)}
    lead_sq = dict.fromkeys(LAYERS, 1e-6) | {LAYERS[2]: 1.0, LAYERS[3]: 1.0}  # units 2 and 3: unsure
    after_b = [dict.fromkeys(LAYERS, "B")]
    alternating = _settings(confidence=0.5, beta=0.9)
    to_b = _settings(confidence=0.5, beta=0.9, unsure="B")
    only_b = _settings(confidence=0.5, beta=0.9, unsure="B", confident_factors="B")
    assert [decide(3, alternating, ema, after_b, lead_sq)[layer] for layer in LAYERS] == ["A", "B", "A", "A", "A", "B"]
    assert [decide(3, to_b, ema, after_b, lead_sq)[layer] for layer in LAYERS] == ["A", "B", "B", "B", "A", "B"]
    after_a = [dict.fromkeys(LAYERS, "A")]
    assert [decide(3, only_b, ema, after_a, lead_sq)[layer] for layer in LAYERS] == ["B"] * 6
    assert [decide(3, only_b, ema, after_b, lead_sq)[layer] for layer in LAYERS] == ["A", "B", "B", "B", "A", "B"]


def test_the_lead_spread_is_an_ema_of_the_squared_unit_lead() -> None:
    groups = layer_groups(LAYERS, "group", ("block",))
    scores = {layer: {"A": 1.0, "B": 0.0} for layer in LAYERS}
    lead_sq = update_lead_sq({}, scores, groups, beta=0.5)
    assert lead_sq == {group[0]: 0.5 * 4.0 for group in groups}  # q and v summed: a lead of 2 per block
    assert update_lead_sq(lead_sq, scores, groups, beta=0.5) == {group[0]: 3.0 for group in groups}
