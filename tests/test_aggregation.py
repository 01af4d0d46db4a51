"""FFA's aggregation is exact, FedAvg's is not; the reported error is section 5's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aslora.config import SelectionConfig
from aslora.methods import MethodContext, get_method
from aslora.methods.base import aggregation_error
from aslora.protocol import ClientJob, ClientUpdate, GlobalState
from aslora.replica import Replica

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
            examples_seen=0,
        )
        for i in range(n)
    ]


def _weights(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.n_examples for u in updates)
    return [u.n_examples / total for u in updates]


def _one_round(
    method: str, seed: int, trained_as: str | None = None, context: MethodContext | None = None
) -> tuple[GlobalState, list[ClientUpdate], list[float], GlobalState]:
    """Random state, four clients' updates (trained as `trained_as` plans), and `method`'s aggregate."""
    gen = torch.Generator().manual_seed(seed)
    state = _state(gen)
    updates = _updates(state, trained_as or method, gen)
    weights = _weights(updates)
    return state, updates, weights, get_method(method, context).aggregate(state, updates, weights)


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
    state, updates, weights, new = _one_round("ffa", 0)
    for layer in LAYERS:
        a = state.factors[layer]["A"].double()
        assert torch.equal(new.factors[layer]["A"], state.factors[layer]["A"])  # A never moves
        mean_b = sum(w * u.factors[layer]["B"].double() for u, w in zip(updates, weights, strict=True))
        mean_ba = sum(w * u.factors[layer]["B"].double() @ a for u, w in zip(updates, weights, strict=True))
        torch.testing.assert_close(mean_b @ a, mean_ba)
        torch.testing.assert_close(new.factors[layer]["B"].double(), mean_b, rtol=1e-6, atol=1e-6)
    errors = aggregation_error(state, updates, weights, new)
    assert all(e < 1e-6 for e in errors.values())


def test_fedavg_aggregation_is_inexact_and_its_error_matches_numpy() -> None:
    state, updates, weights, new = _one_round("fedavg", 1)
    errors = aggregation_error(state, updates, weights, new)
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
    assert all(e < 1e-6 for e in aggregation_error(state, updates, [1.0], new).values())


def _context() -> MethodContext:
    return MethodContext(selection=SelectionConfig(), eta=0.1, tau=1, nu=0.0, seed=0, rounds=1)


def _numpy_factors(update: ClientUpdate, state: GlobalState, layer: str) -> tuple[np.ndarray, np.ndarray]:
    a = update.factors[layer].get("A", state.factors[layer]["A"]).numpy().astype(np.float64)
    b = update.factors[layer].get("B", state.factors[layer]["B"]).numpy().astype(np.float64)
    return a, b


def _ideal(state: GlobalState, updates: list[ClientUpdate], weights: list[float], layer: str) -> np.ndarray:
    return sum(w * state.scaling[layer] * np.matmul(*_numpy_factors(u, state, layer)[::-1]) for u, w in zip(updates, weights, strict=True))


def test_fedex_folds_the_exact_residual_into_the_frozen_weights() -> None:
    state, updates, weights, new = _one_round("fedex", 3)
    for layer in LAYERS:
        a_bar = sum(w * _numpy_factors(u, state, layer)[0] for u, w in zip(updates, weights, strict=True))
        b_bar = sum(w * _numpy_factors(u, state, layer)[1] for u, w in zip(updates, weights, strict=True))
        np.testing.assert_allclose(new.factors[layer]["A"].numpy(), a_bar, rtol=1e-5, atol=1e-5)
        residual = _ideal(state, updates, weights, layer) - state.scaling[layer] * b_bar @ a_bar
        np.testing.assert_allclose(new.residual[layer].numpy(), residual, rtol=1e-4, atol=1e-4)
    assert max(aggregation_error(state, updates, weights, new).values()) < 1e-6
    # A second round adds to the first residual.
    again = get_method("fedex").aggregate(new, _updates(new, "fedex", torch.Generator().manual_seed(9)), weights)
    assert not torch.equal(again.residual[next(iter(LAYERS))], new.residual[next(iter(LAYERS))])


def test_flora_stacks_merges_and_restarts_the_adapters() -> None:
    state, updates, weights, new = _one_round("flora", 4, trained_as="fedavg", context=_context())
    for layer, (d, k) in LAYERS.items():
        np.testing.assert_allclose(new.residual[layer].numpy(), _ideal(state, updates, weights, layer), rtol=1e-4, atol=1e-4)
        assert torch.equal(new.factors[layer]["B"], torch.zeros(d, RANK))
        bound = 1 / np.sqrt(k)  # PEFT's Kaiming-uniform(a=sqrt(5)) range for lora_A
        assert float(new.factors[layer]["A"].abs().max()) <= bound
        assert not torch.equal(new.factors[layer]["A"], state.factors[layer]["A"])
    assert max(aggregation_error(state, updates, weights, new).values()) < 1e-6


def test_fedsvd_refactorises_the_aggregate_exactly() -> None:
    gen = torch.Generator().manual_seed(5)
    state = _state(gen)
    updates = _updates(state, "fedsvd", gen)
    assert all(set(u.factors[layer]) == {"B"} for u in updates for layer in LAYERS)
    weights = _weights(updates)
    new = get_method("fedsvd").aggregate(state, updates, weights)
    for layer in LAYERS:
        b_bar = sum(w * _numpy_factors(u, state, layer)[1] for u, w in zip(updates, weights, strict=True))
        m = b_bar @ state.factors[layer]["A"].numpy().astype(np.float64)
        _, s, vh = np.linalg.svd(m, full_matrices=False)
        a_new = new.factors[layer]["A"].numpy()
        np.testing.assert_allclose(a_new @ a_new.T, np.eye(RANK), atol=1e-5)  # A = V_r^T: orthonormal rows
        np.testing.assert_allclose(np.abs(a_new), np.abs(vh[:RANK]), atol=1e-4)  # up to the SVD's signs
        np.testing.assert_allclose(new.factors[layer]["B"].numpy() @ a_new, m, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(new.factors[layer]["B"].numpy(), axis=0), s[:RANK], rtol=1e-4)
    assert max(aggregation_error(state, updates, weights, new).values()) < 1e-5


def test_flexlora_truncates_the_aggregate_to_the_best_rank_r() -> None:
    state, updates, weights, new = _one_round("flexlora", 6, trained_as="fedavg")
    errors = aggregation_error(state, updates, weights, new)
    for layer in LAYERS:
        singular = np.linalg.svd(_ideal(state, updates, weights, layer), compute_uv=False)
        eckart_young = np.sqrt((singular[RANK:] ** 2).sum() / (singular**2).sum())
        assert errors[layer] == pytest.approx(eckart_young, rel=1e-4)
    one = get_method("flexlora").aggregate(state, updates[:1], [1.0])
    assert max(aggregation_error(state, updates[:1], [1.0], one).values()) < 1e-5


def test_fedsa_shares_a_while_b_and_head_stay_with_each_client() -> None:
    """The server averages A and never holds a trained B or head; each client's replica keeps its
    own and starts the next round from them; only the simulation's evaluation view averages them."""
    gen = torch.Generator().manual_seed(7)
    method = get_method("fedsa")
    state = _state(gen).evolve(head={"w": torch.zeros(3)})
    mask = method.plan(0, state)
    replicas = {c: Replica(state.tensors()) for c in range(3)}
    first = _updates(state, "fedsa", gen, n=3)
    for u in first:
        u.head = {"w": torch.full((3,), float(u.client_id))}
        start, _ = replicas[u.client_id].run(ClientJob(u.client_id, 0, 0, mask), method, lambda s, j, u=u: u, dict)
        assert torch.equal(start.factors["l0"]["B"], state.factors["l0"]["B"])  # the seeded initial B
    weights = _weights(first)
    after = method.aggregate(state, first, weights)
    for layer in LAYERS:
        a_bar = sum(w * u.factors[layer]["A"].double() for u, w in zip(first, weights, strict=True))
        torch.testing.assert_close(after.factors[layer]["A"].double(), a_bar, rtol=1e-6, atol=1e-6)
        assert torch.equal(after.factors[layer]["B"], state.factors[layer]["B"])  # the server never saw B
    assert torch.equal(after.head["w"], state.head["w"])
    assert all(k.endswith("lora_A") for k in method.uploaded(first[0]))  # B and head stay local
    download = method.downloaded(after)
    assert all(k.endswith("lora_A") for k in download)
    for client, update in enumerate(first):  # round two: the shared A, the client's own B and head
        own = replicas[client].start(ClientJob(client, 1, 0, mask, download=download), method)
        for layer in LAYERS:
            assert torch.equal(own.factors[layer]["A"], after.factors[layer]["A"])
            assert torch.equal(own.factors[layer]["B"], update.factors[layer]["B"])
        assert torch.equal(own.head["w"], torch.full((3,), float(client)))
    view = method.evaluation_view(after, [r.own for r in replicas.values()] + [{}])  # one never trained
    b_mean = sum(u.factors["l0"]["B"].double() for u in first) / 3
    torch.testing.assert_close(view.factors["l0"]["B"].double(), b_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(view.head["w"], torch.full((3,), 1.0))
    assert method.evaluation_view(after, None) is None  # a Flower server has no such view


def test_flora_stacks_heterogeneous_ranks() -> None:
    gen = torch.Generator().manual_seed(8)
    state = _state(gen)
    ranks = (1, 2, 3, 3)
    updates = _updates(state, "fedavg", gen)
    for u, r in zip(updates, ranks, strict=True):  # what a rank-r client sends back: zero padding
        for fs in u.factors.values():
            fs["A"][r:] = 0
            fs["B"][:, r:] = 0
    weights = _weights(updates)
    context = MethodContext(selection=SelectionConfig(), eta=0.1, tau=1, nu=0.0, seed=0, rounds=1, client_ranks=ranks)
    flora = get_method("flora", context)
    new = flora.aggregate(state, updates, weights)
    for layer in LAYERS:
        expected = sum(
            w * state.scaling[layer] * u.factors[layer]["B"][:, :r].double().numpy() @ u.factors[layer]["A"][:r].double().numpy()
            for u, w, r in zip(updates, weights, ranks, strict=True)
        )
        np.testing.assert_allclose(new.residual[layer].numpy(), expected, rtol=1e-4, atol=1e-4)
    for u, r in zip(updates, ranks, strict=True):
        sent = flora.uploaded(u)
        assert all(t.shape[0] == r for k, t in sent.items() if k.endswith("lora_A"))
        assert all(t.shape[1] == r for k, t in sent.items() if k.endswith("lora_B"))
        assert all(torch.equal(t, u.tensors()[k]) for k, t in flora.restored(u.client_id, sent, state.tensors()).items())
        received = flora.download_for(u.client_id, new.tensors())  # the fresh adapters, cut to the client's rank
        assert all(t.shape[0] == r for k, t in received.items() if k.endswith("lora_A"))
        assert all(torch.equal(t, new.residual[k.removesuffix(".residual")]) for k, t in received.items() if k.endswith("residual"))
        held = Replica(state.tensors())
        start = held.start(ClientJob(u.client_id, 1, 0, flora.plan(1, new), rank=r, download=received), flora)
        for layer in LAYERS:
            assert torch.equal(start.factors[layer]["A"][:r], new.factors[layer]["A"][:r])
            assert not start.factors[layer]["A"][r:].any()  # the padding a rank-r client holds at zero
