"""The method interface and what travels between server and clients.

A method decides which factors each layer trains in a round (`plan`) and how
the server turns the clients' factors into the next global ones
(`aggregate`). Both are pure functions of state and updates, so they are
testable without a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from aslora.adapters import Factors
from aslora.protocol import ClientUpdate, GlobalState, Mask
from aslora.stepsize import a_step_scale

if TYPE_CHECKING:  # the config validates method names from the registry, so it imports the methods
    from aslora.config import ExperimentConfig, SelectionConfig

ProbeLoss = Callable[[GlobalState], float]  # a state's mean loss on the server's probe set (data.probe_size)


@dataclass(frozen=True)
class MethodContext:
    """What a method may need from the run: AS-LoRA's settings, step size, steps, DP noise, seed."""

    selection: SelectionConfig
    eta: float
    tau: int
    nu: float  # per-coordinate DP noise variance of one step: (sigma C / b)^2
    seed: int
    rounds: int
    client_ranks: tuple[int, ...] = ()  # heterogeneous LoRA ranks (FLoRA); empty: all r
    a_lr_scale: float = 1.0  # optim.a_lr_scale: A steps at eta * a_lr_scale
    a_lr_rule: str = "fixed"  # optim.a_lr_rule: 'balanced' caps each layer's A scale at |A| / |B|

    def eta_of(self, factor: str, pair: Mapping[str, torch.Tensor]) -> float:
        """The step size `factor` of a layer whose factors are `pair` trains at (as clients set it)."""
        if factor != "A":
            return self.eta
        return self.eta * a_step_scale(self.a_lr_rule, self.a_lr_scale, pair["A"], pair["B"])


class Method(ABC):
    """One federated LoRA method: a client rule and a server rule, and what the rest of the
    software must know about it (the class attributes below; methods/__init__.py registers it)."""

    name: str
    # What clients measure for the server, a kind of methods/statistics.py: None; "moments" (every
    # factor in the DP-SGD step, G, Q, T uploaded); "last_step" (the official rule's score).
    statistics: str | None = None
    needs_context: bool = False  # built with the run's MethodContext (selection, step size, noise)
    linear_server: bool = False  # the server step is a weighted sum of the uploads: SecAgg+ can run it
    heterogeneous_ranks: bool = False  # clients may train below the model's rank (lora.client_ranks)
    oracle: bool = False  # a non-private upper bound: never a baseline of a comparison
    plots: tuple[str, ...] = ("mask",)  # a run's figures beside metrics.png (results.PLOTS)
    # Named variants, as config overrides ("aslora random": {"method": "aslora", ...}).
    variants: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        """Refuse, with a ValueError that names the key and the fix, settings this method cannot run."""

    @abstractmethod
    def plan(self, round_index: int, state: GlobalState) -> Mask:
        """Which factors every layer trains in this round."""

    @abstractmethod
    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        """The next global state from the clients' trained factors."""

    # True: judged by the clients' own models, which each scores on its held-out split (FedSA-LoRA).
    personalised: bool = False
    dev_model: str = "the server's global model"  # what the dev figures score, as summary.json says

    def downloaded(self, state: GlobalState) -> dict[str, torch.Tensor]:
        """The tensors clients hold from the server, by name (the download is what changed)."""
        return state.tensors()

    def download_for(self, client: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What of `tensors` this client needs (FLoRA: its rank's components)."""
        return tensors

    def uploaded(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        """The tensors a client sends: its trained factors and its head."""
        return update.tensors()

    def restored(
        self, client: int, tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Tensors as they travelled (`download_for`, `uploaded`), back in the model's shapes of `like`."""
        return tensors

    def kept(self, update: ClientUpdate) -> dict[str, torch.Tensor]:
        """What a client keeps for itself after its round and never sends (FedSA-LoRA: B and head)."""
        return {}

    def evaluation_view(
        self, state: GlobalState, kept: Sequence[dict[str, torch.Tensor]] | None
    ) -> GlobalState | None:
        """The model the dev split scores: the server's own, or for a personalised method a view
        built from what the clients keep (`kept`: None where the engine cannot see it)."""
        return state

    def client_rank(self, client: int) -> int | None:
        """The LoRA rank this client trains at, if below the model's (heterogeneous ranks)."""
        return None

    def weight(self, n_examples: int) -> int:
        """A client's unnormalised aggregation weight (by default its example count).

        An integer, as secure aggregation (SecAgg+) carries it.
        """
        return n_examples

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """Aggregation weights p_i: each client's share of the round's total weight."""
        raw = [self.weight(u.n_examples) for u in updates]
        return [w / sum(raw) for w in raw]

    def describe(self, state: GlobalState) -> dict[str, Any]:
        """Method-specific figures to log with the round (AS-LoRA: its scores)."""
        return {}

    def trials(self, round_index: int, state: GlobalState) -> list[Mask] | None:
        """Masks to train side by side this round, then `choose` between (lookahead oracles);
        None: train the one mask `plan` gives."""
        return None

    def choose(
        self,
        state: GlobalState,
        candidates: Sequence[tuple[Mask, GlobalState]],
        probe: ProbeLoss,
    ) -> tuple[GlobalState, Mask]:
        """The next state and the mask it amounts to, from the trials' averaged states."""
        raise NotImplementedError(f"method {self.name!r} trains one mask per round: it has nothing to choose")


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i, computed in float64 and returned in the inputs' dtype."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights, strict=True):
        acc += float(weight) * tensor.to(torch.float64)
    return acc.to(tensors[0].dtype)


def average_trained_factors(
    state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> Factors:
    """Average each (layer, factor) that the clients trained; keep the rest.

    When a layer trains one factor and the other is shared, this is exact:
    mean(B_i) A = mean(B_i A).
    """
    new = {layer: dict(factors) for layer, factors in state.factors.items()}
    for layer, factors in updates[0].factors.items():
        for factor in factors:
            new[layer][factor] = weighted_mean([u.factors[layer][factor] for u in updates], weights)
    return new


def client_factors(state: GlobalState, update: ClientUpdate) -> Factors:
    """The client's full factors after its round: trained ones from the update, others global."""
    return {
        layer: {**factors, **update.factors.get(layer, {})} for layer, factors in state.factors.items()
    }


def mean_product(full: Sequence[Factors], weights: Sequence[float], layer: str) -> torch.Tensor:
    """sum_i p_i B_i A_i of one layer, in float64, from the clients' full factors."""
    return sum(
        float(w) * (f[layer]["B"].double() @ f[layer]["A"].double()) for f, w in zip(full, weights, strict=True)
    )


def aggregation_error(
    before: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float], after: GlobalState
) -> dict[str, float]:
    """Per layer ||sum_i p_i s B_i A_i - s B_new A_new||_F / ||sum_i p_i s B_i A_i||_F.

    ALGORITHM.md section 5; 0 where the ideal update is exactly zero. What a
    method folds into the frozen weights this round counts as achieved.
    """
    errors = {}
    full = [client_factors(before, u) for u in updates]
    for layer, s in before.scaling.items():
        ideal = s * mean_product(full, weights, layer)
        new = after.factors[layer]
        achieved = s * (new["B"].double() @ new["A"].double())
        if layer in after.residual:
            folded = after.residual[layer].double() - before.residual.get(layer, torch.zeros(())).double()
            achieved = achieved + folded
        norm = torch.linalg.matrix_norm(ideal)
        errors[layer] = (
            0.0 if norm == 0 else float(torch.linalg.matrix_norm(ideal - achieved) / norm)
        )
    return errors


class AveragingMethod(Method, ABC):
    """A method whose server averages each trained factor (exact when one factor trains)."""

    def aggregate(
        self, state: GlobalState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> GlobalState:
        return state.evolve(factors=average_trained_factors(state, updates, weights))
