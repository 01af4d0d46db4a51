"""LS-refit (methods/refit.py), the method added as one file: its B is the least-squares fit of
the ideal update to the averaged A, so its aggregation error never exceeds FedAvg's."""

from __future__ import annotations

from pathlib import Path

import torch

from aslora.config import load_config
from aslora.experiment import run_experiment
from aslora.methods import METHODS, NAMES, SECURE, get_method
from aslora.methods.base import aggregation_error, client_factors, mean_product
from aslora.protocol import ClientUpdate, GlobalState

REPO = Path(__file__).resolve().parents[1]


def _round(seed: int, shared_a: bool = False) -> tuple[GlobalState, list[ClientUpdate], list[float]]:
    gen = torch.Generator().manual_seed(seed)
    layers = {"l0": (12, 10), "l1": (6, 9)}
    state = GlobalState(
        factors={n: {"A": torch.randn(3, k, generator=gen), "B": torch.randn(d, 3, generator=gen)}
                 for n, (d, k) in layers.items()},
        head={}, scaling=dict.fromkeys(layers, 2.0),
    )
    updates = [
        ClientUpdate(i, 10 * (i + 1), {
            n: {"A": fs["A"] if shared_a else fs["A"] + torch.randn(fs["A"].shape, generator=gen),
                "B": fs["B"] + torch.randn(fs["B"].shape, generator=gen)}
            for n, fs in state.factors.items()
        }, {}, 0.0, 0)
        for i in range(4)
    ]
    total = sum(u.n_examples for u in updates)
    return state, updates, [u.n_examples / total for u in updates]


def test_the_refit_is_the_least_squares_b_and_never_worse_than_fedavg() -> None:
    for seed in range(5):
        state, updates, weights = _round(seed)
        refit = get_method("refit").aggregate(state, updates, weights)
        fedavg = get_method("fedavg").aggregate(state, updates, weights)
        ours, theirs = aggregation_error(state, updates, weights, refit), aggregation_error(state, updates, weights, fedavg)
        assert all(ours[layer] < theirs[layer] for layer in ours), (ours, theirs)
        full = [client_factors(state, u) for u in updates]
        for layer, fs in refit.factors.items():
            torch.testing.assert_close(fs["A"], fedavg.factors[layer]["A"])  # A is FedAvg's mean
            ideal, a = mean_product(full, weights, layer), fs["A"].double()
            expected = torch.linalg.lstsq(a.T, ideal.T).solution.T  # min_B ||ideal - B A||_F
            torch.testing.assert_close(fs["B"].double(), expected, rtol=1e-5, atol=1e-6)


def test_with_one_shared_a_the_refit_is_exact() -> None:
    state, updates, weights = _round(0, shared_a=True)
    errors = aggregation_error(state, updates, weights, get_method("refit").aggregate(state, updates, weights))
    assert max(errors.values()) < 1e-5


def test_one_file_makes_a_method_every_command_knows(tmp_path: Path) -> None:
    assert "refit" in METHODS and "refit" in NAMES and "refit" not in SECURE  # a non-linear server step
    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides({
        "method": "refit", "federation.rounds": 3, "output_dir": str(tmp_path), "data.probe_size": 0,
    })
    result = run_experiment(config)
    errors = [r.agg_error for r in result.records]
    assert result.summary["method"] == "refit" and len(errors) == 3 and all(e is not None and e < 0.5 for e in errors)
    assert result.summary["epsilon"] <= config.privacy.epsilon
