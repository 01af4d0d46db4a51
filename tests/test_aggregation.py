"""FFA's aggregation is exact, FedAvg's is not; the reported error is section 5's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aslora.methods import GlobalState, get_method
from aslora.methods.base import ClientUpdate, aggregation_error

LAYERS = {"l0": (12, 10), "l1": (6, 9)}  # name -> (d_out, d_in)
RANK = 3


def _state(gen: torch.Generator) -> GlobalState:
    factors = {
        name: {"A": torch.randn(RANK, k, generator=gen), "B": torch.randn(d, RANK, generator=gen)}
        for name, (d, k) in LAYERS.items()
    }
    return GlobalState(factors=factors, head={}, scaling={name: 2.0 for name in LAYERS})


def _updates(state: GlobalState, method: str, gen: torch.Generator, n: int = 4) -> list[ClientUpdate]:
    mask = get_method(method).plan(0, state)
    return [
        ClientUpdate(
            client_id=i,
            n_examples=10 * (i + 1),
            factors={
                layer: {f: state.factors[layer][f] + torch.randn(state.factors[layer][f].shape, generator=gen) for f in fs}
                for layer, fs in mask.items()
            },
            head={},
            loss=0.0,
            examples_seen=0,
        )
        for i in range(n)
    ]


def _weights(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.n_examples for u in updates)
    return [u.n_examples / total for u in updates]


def _numpy_ideal_and_error(state, updates, weights, after, layer):
    """Section 5 in NumPy: the weighted mean of the clients' products vs the product of the result."""
    s = state.scaling[layer]
    products = []
    for u in updates:
        a = u.factors[layer].get("A", state.factors[layer]["A"]).numpy().astype(np.float64)
        b = u.factors[layer].get("B", state.factors[layer]["B"]).numpy().astype(np.float64)
        products.append(s * b @ a)
    ideal = sum(w * p for w, p in zip(weights, products, strict=True))
    achieved = s * after[layer]["B"].numpy().astype(np.float64) @ after[layer]["A"].numpy().astype(np.float64)
    return np.linalg.norm(ideal - achieved) / np.linalg.norm(ideal)


def test_ffa_aggregation_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    state = _state(gen)
    updates = _updates(state, "ffa", gen)
    weights = _weights(updates)
    new = get_method("ffa").aggregate(state, updates, weights)
    for layer in LAYERS:
        a = state.factors[layer]["A"].double()
        assert torch.equal(new.factors[layer]["A"], state.factors[layer]["A"])  # A never moves
        mean_b = sum(w * u.factors[layer]["B"].double() for u, w in zip(updates, weights, strict=True))
        mean_ba = sum(w * u.factors[layer]["B"].double() @ a for u, w in zip(updates, weights, strict=True))
        torch.testing.assert_close(mean_b @ a, mean_ba)
        torch.testing.assert_close(new.factors[layer]["B"].double(), mean_b, rtol=1e-6, atol=1e-6)
    errors = aggregation_error(state, updates, weights, new.factors)
    assert all(e < 1e-6 for e in errors.values())


def test_fedavg_aggregation_is_inexact_and_its_error_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(1)
    state = _state(gen)
    updates = _updates(state, "fedavg", gen)
    weights = _weights(updates)
    new = get_method("fedavg").aggregate(state, updates, weights)
    errors = aggregation_error(state, updates, weights, new.factors)
    for layer in LAYERS:
        expected = _numpy_ideal_and_error(state, updates, weights, new.factors, layer)
        assert expected > 1e-2  # mean(B) mean(A) != mean(BA)
        assert errors[layer] == pytest.approx(expected, rel=1e-9)
        for f in ("A", "B"):
            mean = sum(w * u.factors[layer][f].double() for u, w in zip(updates, weights, strict=True))
            torch.testing.assert_close(new.factors[layer][f].double(), mean, rtol=1e-6, atol=1e-6)


def test_one_client_aggregates_exactly_even_for_fedavg() -> None:
    gen = torch.Generator().manual_seed(2)
    state = _state(gen)
    updates = _updates(state, "fedavg", gen, n=1)
    new = get_method("fedavg").aggregate(state, updates, [1.0])
    assert all(e < 1e-6 for e in aggregation_error(state, updates, [1.0], new.factors).values())
