"""AS-LoRA on the real model: joint or group-wise clipping over all factors, exactness, schedules,
privacy cost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import metric_rows
from safetensors.torch import load_file

from aslora.adapters import FACTORS, LoraView
from aslora.client import LocalSettings, train_client
from aslora.config import ConfigError, ExperimentConfig, parse_config
from aslora.experiment import run_experiment
from aslora.methods import ABLATIONS, get_method
from aslora.methods.base import MethodContext
from aslora.privacy import DPSettings
from aslora.protocol import ClientJob, GlobalState
from aslora.selection import ScoreSettings, score
from aslora.tasks import load_task


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _random_start(view: LoraView) -> tuple[dict[str, dict[str, torch.Tensor]], GlobalState]:
    """Small seeded A and B in every layer (B != 0, so A has a gradient), and the state holding them."""
    gen = torch.Generator().manual_seed(0)
    factors = {
        layer: {f: torch.randn(view.parameter(layer, f).shape, generator=gen) * 0.05 for f in FACTORS}
        for layer in view.layers
    }
    state = GlobalState(factors=factors, head=view.get_head(), scaling={layer: view.scaling(layer) for layer in view.layers})
    return factors, state


@pytest.fixture
def dp_config(tiny_config: ExperimentConfig) -> ExperimentConfig:
    """A fixed sigma, so that every method below trains with the same noise."""
    return tiny_config.with_overrides({"privacy.noise_multiplier": 2.0})


def test_each_client_uploads_g_floored_only_where_the_run_asks(dp_config: ExperimentConfig) -> None:
    """selection.floor_g: true uploads ALGORITHM.md 4.1's max(G, 0); false the unbiased G of the
    same privatised gradients (same job seed, same noise). The floor is the client's, so that a
    SecAgg+ sum of the statistics stays the spec's mean."""
    task = load_task(dp_config)
    view = LoraView(task.build_model(dp_config))
    _, state = _random_start(view)
    mask = {layer: ("B",) for layer in view.layers}
    uploads = {}
    for floor in (True, False):
        settings = LocalSettings(
            steps=1, batch_size=16, lr=0.5, optimizer="sgd", dp=DPSettings(True, 2.0, 1.0), accountant="rdp",
            train_head=True, floor_g=floor,
        )
        job = ClientJob(0, 0, 123, mask, statistics="moments")
        uploads[floor] = train_client(view, task.encode(task.train), state, job, settings, task.loss).stats
    raw = [s for fs in uploads[False].values() for s in fs.values()]
    floored = [s for fs in uploads[True].values() for s in fs.values()]
    assert any(s["G"] < 0 for s in raw)  # one noisy step: some factors' G lie below the noise floor
    assert floored == [{**s, "G": max(s["G"], 0.0)} for s in raw]


def test_round_zero_trains_b_and_scores_a_at_exactly_zero(tiny_config: ExperimentConfig) -> None:
    raw = tiny_config.with_overrides(
        {"method": "aslora", "federation.rounds": 1, "federation.local_steps": 1}
    ).model_dump(mode="json")
    raw["privacy"].update(epsilon=None, noise_multiplier=0.0)
    result = run_experiment(parse_config(raw))
    (row,) = metric_rows(result.directory)
    assert all(factors == ["B"] for factors in row["mask"].values())
    for layer, factors in row["selection"]["stats"].items():
        assert factors["A"] == {"G": 0.0, "Q": 0.0, "T": 0.0}, layer  # B = 0: dL/dA = s B^T ... = 0
        assert factors["B"]["G"] > 0
        assert row["selection"]["scores"][layer]["A"] == 0.0
    assert (result.directory / "mask.png").stat().st_size > 0


def test_inactive_factors_are_bit_identical_and_not_uploaded(dp_config: ExperimentConfig) -> None:
    task = load_task(dp_config)
    view = LoraView(task.build_model(dp_config))
    factors, state = _random_start(view)
    mask = {layer: ("A",) if i % 3 == 0 else ("B",) for i, layer in enumerate(view.layers)}
    settings = LocalSettings(
        steps=3, batch_size=16, lr=0.5, optimizer="sgd", dp=DPSettings(True, 2.0, 1.0), accountant="rdp", train_head=True
    )
    update = train_client(view, task.encode(task.train), state, ClientJob(0, 0, 123, mask, statistics="moments"), settings, task.loss)
    assert {layer: tuple(fs) for layer, fs in update.factors.items()} == mask  # only what trained travels
    for layer, (active,) in mask.items():
        inactive = "B" if active == "A" else "A"
        assert torch.equal(view.parameter(layer, inactive).detach(), factors[layer][inactive])
        assert not torch.equal(update.factors[layer][active], factors[layer][active])
        assert set(update.stats[layer]) == set(FACTORS)  # statistics of both factors
    assert update.privacy_history == [(2.0, 16 / len(task.train), 3)]


def test_fixed_schedules_reproduce_their_baselines_bit_for_bit(dp_config: ExperimentConfig) -> None:
    pairs = [("ffa", "always_b"), ("rolora", "alternate")]
    for baseline, schedule in pairs:
        base = run_experiment(dp_config.with_overrides({"method": baseline}))
        ours = run_experiment(dp_config.with_overrides({"method": "aslora", "selection.score": schedule}))
        a, b = _adapter(base.directory), _adapter(ours.directory)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{schedule} differs from {baseline}"
        assert [r["mask"] for r in metric_rows(base.directory)] == [r["mask"] for r in metric_rows(ours.directory)]
    rolora_masks = [{f for fs in r["mask"].values() for f in fs} for r in metric_rows(base.directory)]
    assert rolora_masks == [{"B"}, {"A"}]


def test_aslora_costs_no_extra_privacy(dp_config: ExperimentConfig) -> None:
    """Joint or group-wise clipping (selection.score_clip_share), spec or secant score: the
    accountant's epsilon is FFA's (one FFA run serves the three)."""
    ffa = run_experiment(dp_config.with_overrides({"method": "ffa"}))
    for share, score_kind in [(None, "curvature"), (0.25, "curvature"), (None, "secant")]:
        ours = run_experiment(
            dp_config.with_overrides(
                {"method": "aslora", "selection.score_clip_share": share, "selection.score": score_kind}
            )
        )
        assert [r["epsilon"] for r in metric_rows(ours.directory)] == [r["epsilon"] for r in metric_rows(ffa.directory)]
        assert ours.summary["epsilon"] > 0
        rows = metric_rows(ours.directory)
        assert all(set(r["selection"]["scores"]) == set(r["mask"]) for r in rows)
        assert all(r["agg_error"] < 1e-6 for r in rows)  # exact, whatever the mask


def test_official_rule_runs_under_dp_with_exact_aggregation(dp_config: ExperimentConfig) -> None:
    config = dp_config.with_overrides({"method": "aslora", "selection.rule": "official", "federation.rounds": 3})
    result = run_experiment(config)
    rows = metric_rows(result.directory)
    assert {f for fs in rows[0]["mask"].values() for f in fs} == {"B"}  # warm-up starts with B
    for row in rows:
        active = {layer: fs[0] for layer, fs in row["mask"].items()}
        assert {layer: set(fs) for layer, fs in row["selection"]["scores"].items()} == {
            layer: {f} for layer, f in active.items()
        }
        assert row["agg_error"] < 1e-6
    ffa = run_experiment(dp_config.with_overrides({"method": "ffa", "federation.rounds": 3}))
    assert [r["epsilon"] for r in rows] == [r["epsilon"] for r in metric_rows(ffa.directory)]


def test_the_official_rule_averages_uniformly_unless_told_to_weight_by_examples(dp_config: ExperimentConfig) -> None:
    """The authors' code averages the clients with equal weights; `official_weights = 'examples'` keeps
    their selection and weights by examples as every other method, so that the two can be told apart."""
    def weights(overrides: dict) -> list[int]:
        selection = dp_config.with_overrides({"method": "aslora", **overrides}).selection
        context = MethodContext(selection=selection, eta=1.0, tau=1, nu=0.0, seed=0, rounds=10)
        return [get_method("aslora", context).weight(n) for n in (100, 2500)]

    assert weights(ABLATIONS["aslora official"]) == [1, 1]
    assert weights(ABLATIONS["aslora official-weighted"]) == [100, 2500]
    assert weights({}) == [100, 2500]  # the spec rule
    with pytest.raises(ValueError, match="official_weights sets the official rule's averaging"):
        dp_config.with_overrides({"method": "aslora", "selection.official_weights": "examples"})


def test_a_zero_score_share_is_refused_where_the_score_reads_the_inactive_factors(
    dp_config: ExperimentConfig,
) -> None:
    with pytest.raises(ValueError, match="score_clip_share=0 leaves the inactive factors no gradient"):
        dp_config.with_overrides({"method": "aslora", "selection.score_clip_share": 0.0})
    allowed = dp_config.with_overrides({"selection.score": "alternate", "selection.score_clip_share": 0.0})
    assert allowed.selection.score_clip_share == 0.0


def _one_plain_step_per_scale(config: ExperimentConfig, scale_key: str) -> tuple[GlobalState, dict]:
    """One plain SGD step (no DP) from the same random state on the same batch, with LocalSettings'
    `scale_key` at 1 and at 0.25: the start, and the two updates by scale."""
    task = load_task(config)
    data = task.encode(task.train)
    view = LoraView(task.build_model(config))
    _, state = _random_start(view)
    job = ClientJob(0, 0, 7, {layer: FACTORS for layer in view.layers})
    updates = {}
    for scale in (1.0, 0.25):
        settings = LocalSettings(
            steps=1, batch_size=16, lr=0.5, optimizer="sgd", dp=DPSettings(False, 0.0, 1.0), accountant="rdp",
            train_head=True, **{scale_key: scale},
        )
        updates[scale] = train_client(view, data, state, job, settings, task.loss)
    return state, updates


def test_a_lr_scale_slows_only_the_a_factors(dp_config: ExperimentConfig) -> None:
    """optim.a_lr_scale (LoRA+): one plain SGD step from the same state on the same batch moves A by
    the scale times what lr 1x moves it, and B and the head exactly as before."""
    state, updates = _one_plain_step_per_scale(dp_config, "a_lr_scale")
    for layer, start in state.factors.items():
        moved = updates[1.0].factors[layer]["A"] - start["A"]
        assert moved.abs().max() > 0
        torch.testing.assert_close(updates[0.25].factors[layer]["A"] - start["A"], 0.25 * moved)
        torch.testing.assert_close(updates[0.25].factors[layer]["B"], updates[1.0].factors[layer]["B"])
    for name, tensor in updates[1.0].head.items():
        torch.testing.assert_close(updates[0.25].head[name], tensor)


def test_balanced_a_lr_caps_each_layer_s_a_step_at_its_factor_ratio(dp_config: ExperimentConfig) -> None:
    """optim.a_lr_rule 'balanced': from a state whose B outgrows A in some layers, one plain SGD step
    moves each layer's A by min(1, |A| / |B|) of what the fixed rule moves it, and B as before."""
    task = load_task(dp_config)
    data = task.encode(task.train)
    view = LoraView(task.build_model(dp_config))
    factors, _ = _random_start(view)
    grown = {
        layer: {"A": pair["A"], "B": pair["B"] * (0.5 + 4 * i)} for i, (layer, pair) in enumerate(factors.items())
    }
    state = GlobalState(factors=grown, head=view.get_head(), scaling={layer: view.scaling(layer) for layer in view.layers})
    job = ClientJob(0, 0, 7, {layer: FACTORS for layer in view.layers})
    updates = {
        rule: train_client(view, data, state, job, LocalSettings(
            steps=1, batch_size=16, lr=0.5, optimizer="sgd", dp=DPSettings(False, 0.0, 1.0), accountant="rdp",
            train_head=True, a_lr_rule=rule,
        ), task.loss)
        for rule in ("fixed", "balanced")
    }
    capped = 0
    for layer, start in grown.items():
        ratio = min(1.0, float(start["A"].norm() / start["B"].norm()))
        capped += ratio < 1
        moved = updates["fixed"].factors[layer]["A"] - start["A"]
        torch.testing.assert_close(updates["balanced"].factors[layer]["A"] - start["A"], ratio * moved)
        torch.testing.assert_close(updates["balanced"].factors[layer]["B"], updates["fixed"].factors[layer]["B"])
    assert 0 < capped < len(grown)  # some layers capped, some not


def test_the_score_of_a_takes_the_balanced_step(dp_config: ExperimentConfig) -> None:
    """The server scores A at the lr its clients will step at: under 'balanced', |A| / |B| of the next
    round's global factors times lr, within a_lr_scale; B at lr."""
    context = MethodContext(
        selection=dp_config.selection, eta=4.0, tau=1, nu=0.0, seed=0, rounds=1, a_lr_scale=0.25, a_lr_rule="balanced"
    )
    a, b = torch.ones(2, 8), torch.ones(8, 2)  # |A| = |B| = 4
    assert context.eta_of("A", {"A": a, "B": 8 * b}) == pytest.approx(4.0 / 8)
    assert context.eta_of("A", {"A": a, "B": b}) == pytest.approx(4.0 * 0.25)  # the cap
    assert context.eta_of("A", {"A": a, "B": 0 * b}) == pytest.approx(4.0 * 0.25)  # B = 0: nothing to balance
    assert context.eta_of("B", {"A": a, "B": 8 * b}) == 4.0
    fixed = MethodContext(selection=dp_config.selection, eta=4.0, tau=1, nu=0.0, seed=0, rounds=1, a_lr_scale=0.25)
    assert fixed.eta_of("A", {"A": a, "B": 8 * b}) == pytest.approx(1.0)


def test_head_lr_scale_slows_only_the_head(dp_config: ExperimentConfig) -> None:
    """optim.head_lr_scale: one plain SGD step moves the head by the scale times what lr 1x moves it,
    and the factors exactly as before."""
    state, updates = _one_plain_step_per_scale(dp_config, "head_lr_scale")
    for name, start in state.head.items():
        moved = updates[1.0].head[name] - start
        assert moved.abs().max() > 0
        torch.testing.assert_close(updates[0.25].head[name] - start, 0.25 * moved)
    for layer in state.factors:
        for f in FACTORS:
            torch.testing.assert_close(updates[0.25].factors[layer][f], updates[1.0].factors[layer][f])


def test_the_score_of_a_uses_a_s_own_lr(dp_config: ExperimentConfig) -> None:
    """With a_lr_scale the predicted decrease of training A is taken at A's step size (4.2 with
    eta_A = lr * a_lr_scale), that of B at lr."""
    config = dp_config.with_overrides({"method": "aslora", "optim.a_lr_scale": 0.25})
    result = run_experiment(config)
    rows = metric_rows(result.directory)
    noise = config.privacy.noise_multiplier * config.privacy.clip / config.optim.batch_size
    clients = config.federation.clients_per_round
    checked = 0
    for row in rows:
        for layer, factors in row["selection"]["stats"].items():
            for factor, stats in factors.items():
                eta = config.optim.lr * (0.25 if factor == "A" else 1.0)
                settings = ScoreSettings("curvature", eta, config.federation.local_steps, noise**2)
                assert row["selection"]["scores"][layer][factor] == pytest.approx(score(stats, settings, clients))
                checked += factor == "A" and stats["G"] > 0
    assert checked > 0  # some of A's scores are not trivially zero


def test_the_secant_score_needs_two_local_steps(dp_config: ExperimentConfig) -> None:
    with pytest.raises(ConfigError, match="local_steps to 2 or more"):
        dp_config.with_overrides({"method": "aslora", "selection.score": "secant", "federation.local_steps": 1})
