"""The federation loop, engine-agnostic: sample, plan, train, validate, aggregate, evaluate.

The server keeps every client's privacy history (what Opacus recorded on the
client), and never lets a client train a round that would take it past the
configured (epsilon, delta) budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from aslora.client import LocalSettings
from aslora.diagnostics import ProbeLoss, realised_decrease
from aslora.methods.base import Method, aggregation_error, weighted_mean
from aslora.methods.statistics import kind as statistics_kind
from aslora.model_average import ModelAverage
from aslora.privacy import restore_accountant, spent_epsilon
from aslora.protocol import ClientJob, ClientUpdate, Delivery, GlobalState, Mask
from aslora.server_optimizer import ServerOptimizer
from aslora.stepsize import next_round_multiplier, scheduled_multiplier

log = logging.getLogger(__name__)


class Engine(Protocol):
    """Carries a round's jobs to clients and their updates back."""

    # True: every update it returns carries the secure weighted mean of the round's
    # updates (Method.weight), not the client's own tensors.
    secure_aggregation: bool

    def train(self, jobs: Sequence[ClientJob], done: Callable[[int], None]) -> list[Delivery]:
        """Send each job (its download included) to its client; each client trains from its own
        replica; return what came back and the bytes each way, as sent."""
        ...

    def kept_by_clients(self) -> dict[int, dict[str, torch.Tensor]] | None:
        """What each client keeps for itself, where this engine can see it (a simulation); else None."""
        ...

    def restore_kept(self, kept: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Resume: hand the clients back what a checkpoint kept of their own tensors."""
        ...


@dataclass(frozen=True)
class ServerSettings:
    rounds: int
    clients_per_round: int
    eval_every: int
    seed: int
    local: LocalSettings  # how clients train: what a round costs them, how far it can move them
    delta: float
    epsilon_budget: float | None
    dropout: float = 0.0
    stragglers: float = 0.0
    min_clients: int = 1
    secure_aggregation: bool = False  # the engine returns only the secure sum of the updates
    lr_schedule: str = "constant"  # optim.lr_schedule: each round's lr as a function of the round
    lr_final_scale: float = 0.0

    @property
    def dp_enabled(self) -> bool:
        return self.local.dp.enabled


class RejectedAfterTraining(Exception):
    """A client trained (spending privacy) but its update cannot be used; it is charged the round."""


class NoAnswer(RejectedAfterTraining):
    """A client sent a job did not answer in time (killed, cut off, too slow). It may have trained
    on its data before it was lost, so it is charged the round, like one that did."""


@dataclass(frozen=True)
class RoundTimes:
    """Where a round's time went; the simulator's own measurements (bytes, errors) left out."""

    aggregation_s: float
    server_s: float
    clients_s: float


@dataclass
class RoundRecord:
    """One line of metrics.jsonl."""

    round: int
    clients: list[int]
    rejected: list[int]
    mask: Mask
    train_loss: float
    examples_seen: int
    epsilon: float | None
    delta: float
    agg_error: float | None  # None where it cannot be measured: a skipped round, or a secure sum
    agg_error_per_layer: dict[str, float]
    agg_time_s: float
    server_time_s: float  # the server's own work in the round: plan (AS-LoRA's scores), checks, aggregation
    client_time_s: float  # the sum of the sampled clients' local training times, as each measured it
    bytes_up_per_client: float
    bytes_down_per_client: float
    metrics: dict[str, float] = field(default_factory=dict)
    # The clients' mean loss at each local step (None where every batch was empty): train_loss,
    # step by step, so that a round whose own steps raise the loss shows.
    train_loss_by_step: list[float | None] = field(default_factory=list)
    lr_multiplier: float = 1.0  # the round's lr as a multiple of optim.lr (optim.lr_schedule, 'secant_decay')
    # The clients' mean lr multiplier at each local step (optim.step_control; empty without).
    lr_multiplier_by_step: list[float | None] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    # With a probe set (data.probe_size): the round's realised probe-loss decrease per layer and the
    # scores its decision read (diagnostics.py); server-side measurements, outside the DP scope.
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "mask": {k: list(v) for k, v in self.mask.items()}}


def mean_by_step(per_client: Sequence[Sequence[float | None]]) -> list[float | None]:
    """The mean over clients of each local step's value (a loss, an lr multiplier), skipping the
    Nones of empty batches and the steps a short list lacks."""
    steps = max((len(values) for values in per_client), default=0)
    means: list[float | None] = []
    for k in range(steps):
        values = [v[k] for v in per_client if k < len(v) and v[k] is not None]
        means.append(float(np.mean(values)) if values else None)
    return means


def misreported_cost(reported: Sequence[tuple[float, float, int]], planned: Sequence[tuple[float, float, int]]) -> str | None:
    """Why a client's own privacy history contradicts the job it was sent, or None if it agrees.

    A client that reports less than it was asked to spend ran another job than the one the
    server accounts for: its update is not the one the privacy plan covers."""
    try:
        same = len(reported) == len(planned) and all(
            len(r) == 3 and math.isclose(r[0], p[0], rel_tol=1e-9) and math.isclose(r[1], p[1], rel_tol=1e-9)
            and r[2] == p[2]
            for r, p in zip(reported, planned, strict=False)
        )
    except TypeError:  # not numbers at all: as wrong as a wrong number
        same = False
    if same:
        return None
    return (f"its reported privacy history {reported!r:.200} differs from the job's "
            f"(sigma, sample rate, steps) {list(planned)}; the planned cost is charged")


def expected_names(state: GlobalState, mask: Mask, train_head: bool, method: Method | None = None, client: int = -1) -> set[str]:
    """The tensors a sound update of this job holds: all it trained, or with `method` what its
    upload keeps of them (FedSA-LoRA: A alone)."""
    trained = {layer: {f: state.factors[layer][f] for f in fs} for layer, fs in mask.items() if fs}
    template = ClientUpdate(client, 1, trained, dict(state.head) if train_head else {}, 0.0, 0)
    return set(method.uploaded(template) if method is not None else template.tensors())


def validate_update(
    update: ClientUpdate, state: GlobalState, mask: Mask, expected: set[str], statistics: str | None = None
) -> str | None:
    """Why an update must not be averaged in, or None if it is sound."""
    return layout_problem(update, state, mask, expected, statistics) or value_problem(update)


def layout_problem(
    update: ClientUpdate, state: GlobalState, mask: Mask, expected: set[str], statistics: str | None = None
) -> str | None:
    """Whether the update holds the tensors `expected` of the round, named, shaped and typed as the model's."""
    tensors = update.tensors()
    if set(tensors) != expected:
        return "its tensors are not the ones the round trained"
    if update.n_examples <= 0:
        return "it reports no training examples"
    covered = statistics_kind(statistics).covers(list(state.factors), mask)
    if {layer: set(fs) for layer, fs in update.stats.items()} != covered:
        return "its score statistics do not cover the expected layers and factors"
    reference = state.tensors()
    for name, tensor in tensors.items():
        if tensor.shape != reference[name].shape or tensor.dtype != reference[name].dtype:
            return f"{name} has shape {tuple(tensor.shape)}/{tensor.dtype}, expected {tuple(reference[name].shape)}"
    return None


def value_problem(update: ClientUpdate) -> str | None:
    """Whether any tensor or score statistic is non-finite (or a statistic other than G, K negative).

    G is an unbiased estimate of a squared norm and K a difference of two (the secant), so
    noise can make either negative.
    """
    values = [(k, v) for fs in update.stats.values() for s in fs.values() for k, v in s.items()]
    if not all(math.isfinite(v) and (v >= 0 or k in ("G", "K")) for k, v in values):
        return "its score statistics are negative or non-finite"
    for name, tensor in update.tensors().items():
        if not torch.isfinite(tensor).all():
            return f"{name} holds non-finite values"
    return None


def moved_too_far(update: ClientUpdate, start: GlobalState, local: LocalSettings, n_examples: int) -> str | None:
    """Whether the update lies farther (L2) from where the client started than its DP-SGD round can move it.

    Without DP there is no bound: None. Run by the server, or under SecAgg+ by the client itself.
    """
    if not local.dp.enabled:
        return None
    before = start.tensors()
    tensors = update.tensors()
    distance = math.sqrt(sum(float((t.double() - before[n].double()).square().sum()) for n, t in tensors.items()))
    limit = local.norm_bound(n_examples, sum(t.numel() for t in tensors.values()))
    if distance > limit:
        return f"it moved {distance:.4g} from its start, beyond the {limit:.4g} that its DP-SGD round allows"
    return None


@dataclass
class Trial:
    """One training of the round's clients on one mask: what came back, and its average."""

    mask: Mask
    accepted: list[ClientUpdate]
    rejected: list[int]
    clients_s: float
    weights: list[float] = field(default_factory=list)
    state: GlobalState | None = None  # None: too few sound updates to aggregate
    aggregation_s: float = 0.0
    server_s: float = 0.0  # the server's checks and aggregation of this trial
    answered: set[int] = field(default_factory=set)  # clients known to hold this round's download
    bytes_down: dict[int, int] = field(default_factory=dict)  # per client, as its engine sent them
    bytes_up: dict[int, int] = field(default_factory=dict)  # per client whose reply came back


class Federation:
    """Runs the rounds of one experiment over an engine."""

    def __init__(
        self,
        method: Method,
        engine: Engine,
        state: GlobalState,
        client_sizes: Sequence[int],
        settings: ServerSettings,
        evaluate: Callable[[GlobalState], dict[str, float]],
        train_head: bool,
        probe: ProbeLoss | None = None,
        optimizer: ServerOptimizer | None = None,
        average: ModelAverage | None = None,
    ) -> None:
        self.method = method
        self.optimizer = optimizer  # None: the aggregate is the next state (federation.server_optimizer)
        self.average = average  # None: the dev split scores the last round's model (federation.ema_decay)
        self.engine = engine
        self.state = state
        self.sizes = list(client_sizes)
        self.settings = settings
        self.evaluate = evaluate
        self.train_head = train_head
        self.probe = probe
        self.histories: dict[int, list[tuple[float, float, int]]] = {i: [] for i in range(len(self.sizes))}
        self._version: dict[str, int] = dict.fromkeys(method.downloaded(state), 0)
        # Every client builds the seeded initial state itself: it holds version 0 of each tensor.
        self._initial = dict(self._version)
        self._seen: dict[int, dict[str, int]] = {i: dict(self._initial) for i in range(len(self.sizes))}
        self._synced_round: dict[int, int] = dict.fromkeys(self._seen, -1)  # ClientJob.base
        self.lr_multiplier = 1.0  # the next round's lr as a multiple of optim.lr ('secant_decay')

    def round_lr_multiplier(self, round_index: int) -> float:
        """The round's lr as a multiple of optim.lr: the schedule's, times the secant decay's."""
        settings = self.settings
        scheduled = scheduled_multiplier(settings.lr_schedule, round_index, settings.rounds, settings.lr_final_scale)
        return scheduled * self.lr_multiplier

    def snapshot(self) -> dict[str, Any]:
        """The bookkeeping a checkpoint must keep: privacy histories and the tensors' versions."""
        return {
            "histories": [[c, [list(h) for h in hist]] for c, hist in self.histories.items()],
            "versions": dict(self._version),
            "lr_multiplier": self.lr_multiplier,
        } | ({"optimizer": self.optimizer.state_dict()} if self.optimizer is not None else {}) | (
            {"average": self.average.state_dict()} if self.average is not None else {}
        )

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Resume: the clients restart too, holding the seeded initial state, so the next download
        carries everything that changed since."""
        self.histories = {int(c): [tuple(h) for h in hist] for c, hist in snapshot["histories"]}
        self._version = dict(snapshot["versions"])
        self.lr_multiplier = float(snapshot.get("lr_multiplier", 1.0))  # absent: a checkpoint from before the decay
        if self.optimizer is not None:  # a resume keeps the settings it started with (experiment.py)
            self.optimizer.load_state_dict(snapshot["optimizer"])
        if self.average is not None:
            self.average.load_state_dict(snapshot["average"])
        self._seen = {c: dict(self._initial) for c in self._seen}
        self._synced_round = dict.fromkeys(self._seen, -1)

    # privacy -----------------------------------------------------------------
    def epsilon(self, client: int, extra_round: bool = False) -> float:
        """The client's spent epsilon, or what it would be after one more round."""
        history = list(self.histories[client]) + (self._round_cost(client) if extra_round else [])
        return spent_epsilon(restore_accountant(self.settings.local.accountant, history), self.settings.delta)

    def eligible_clients(self) -> list[int]:
        """Clients whose next round stays within the privacy budget."""
        budget = self.settings.epsilon_budget
        if not self.settings.dp_enabled or budget is None:
            return list(range(len(self.sizes)))
        return [i for i in self.histories if self.epsilon(i, extra_round=True) <= budget + 1e-9]

    # one round ---------------------------------------------------------------
    def sample(self, round_index: int, eligible: Sequence[int]) -> list[int]:
        rng = np.random.default_rng([self.settings.seed, round_index])
        m = min(self.settings.clients_per_round, len(eligible))
        return sorted(int(c) for c in rng.choice(eligible, size=m, replace=False))

    def faults(self, round_index: int, clients: Sequence[int]) -> tuple[set[int], set[int]]:
        """Simulated faults this round (seeded): clients that drop out before training, and
        stragglers whose updates arrive after the round's deadline; `dropout` and
        `stragglers` shares of the sampled clients, disjoint."""
        shuffled = [int(c) for c in np.random.default_rng([self.settings.seed, round_index, 1]).permutation(clients)]
        dropped = round(self.settings.dropout * len(clients))
        late = round(self.settings.stragglers * len(clients))
        return set(shuffled[:dropped]), set(shuffled[dropped : dropped + late])

    def _round_cost(self, client: int) -> list[tuple[float, float, int]]:
        """What one round of DP-SGD costs a client, as the server planned it."""
        local = self.settings.local
        return [(local.dp.noise_multiplier, local.rate(self.sizes[client]), local.steps)]

    def _download(self, client: int) -> dict[str, torch.Tensor]:
        """What the client must receive: every tensor that changed since it last synced, cut to
        what it needs (`Method.download_for`)."""
        current = self.method.downloaded(self.state)
        seen = self._seen[client]
        return self.method.download_for(client, {k: t for k, t in current.items() if seen.get(k, 0) != self._version[k]})

    def run_round(self, round_index: int, done: Callable[[int], None] = lambda _: None) -> RoundRecord | None:
        """Sample, plan, train (once, or once per trial of a lookahead oracle), aggregate, record."""
        eligible = self.eligible_clients()
        if not eligible:
            log.warning("round %d: every client has spent its privacy budget; stopping", round_index)
            return None
        started = time.perf_counter()
        clients = self.sample(round_index, eligible)
        faults = self.faults(round_index, clients)
        masks = self._masks(round_index)
        downloads = {c: self._download(c) for c in clients}
        sent_version = dict(self._version)
        planning_s = time.perf_counter() - started
        trials = [self._trial(round_index, clients, mask, faults, downloads, done) for mask in masks]
        self._mark_synchronised(round_index, clients, trials, sent_version)
        received = time.perf_counter()
        first = trials[0]
        clients_s = sum(t.clients_s for t in trials)
        checks_s = sum(t.server_s for t in trials)  # validation and aggregation inside each trial
        if any(t.state is None for t in trials):
            log.warning(
                "round %d skipped: %d valid updates, fewer than federation.min_clients=%d; the global "
                "model is unchanged", round_index, min(len(t.accepted) for t in trials), self.settings.min_clients,
            )
            times = RoundTimes(0.0, planning_s + checks_s + time.perf_counter() - received, clients_s)
            return self._record(round_index, clients, first.rejected, first.mask, [], times, None, trials)
        new_state, mask = self._outcome(trials)
        aggregated = time.perf_counter()
        errors = self._aggregation_error(trials, new_state)  # of the aggregate, before any server step
        if self.optimizer is not None:
            new_state = self.optimizer.step(self.state, new_state)
        times = RoundTimes(sum(t.aggregation_s for t in trials), planning_s + checks_s + aggregated - received, clients_s)
        diagnostics = self._diagnostics(new_state)
        self._bump_versions(new_state)
        self.state = new_state
        if self.average is not None:
            self.average.update(new_state)
        record = self._record(round_index, clients, first.rejected, mask, first.accepted, times, errors, trials)
        record.diagnostics = diagnostics
        if self.settings.local.step_control == "secant_decay":
            last_steps = [u.step_lr_multipliers[-1] for u in first.accepted if u.step_lr_multipliers]
            self.lr_multiplier = next_round_multiplier(self.lr_multiplier, last_steps)
        return record

    def _masks(self, round_index: int) -> list[Mask]:
        """What the round trains: the method's one mask, or a lookahead oracle's trials."""
        masks = self.method.trials(round_index, self.state) or [self.method.plan(round_index, self.state)]
        if len(masks) > 1 and self.probe is None:
            raise RuntimeError(f"method {self.method.name!r} decides on the server's probe set: set data.probe_size")
        return masks

    def _mark_synchronised(
        self, round_index: int, clients: Sequence[int], trials: Sequence[Trial], sent_version: dict[str, int]
    ) -> None:
        """Synchronised are only the clients that answered. One that failed or was lost may hold
        anything (it may have restarted), so the next download carries everything since the
        seeded initial."""
        answered = set.intersection(*(t.answered for t in trials))
        for c in clients:
            synced = c in answered
            self._seen[c] = dict(sent_version) if synced else dict(self._initial)
            self._synced_round[c] = round_index if synced else -1

    def _outcome(self, trials: Sequence[Trial]) -> tuple[GlobalState, Mask]:
        """The next state and the mask it amounts to; a lookahead oracle keeps, layer by layer, the
        trial the probe set prefers."""
        if len(trials) == 1:
            return trials[0].state, trials[0].mask
        return self.method.choose(self.state, [(t.mask, t.state) for t in trials], self.probe)

    def _aggregation_error(self, trials: Sequence[Trial], new_state: GlobalState) -> dict[str, float] | None:
        """Per layer, how far the new state is from the ideal mean of the clients' products.

        Under secure aggregation every accepted update carries the same sum: the ideal
        sum_i p_i B_i A_i is unknown to the server, so the error is not measured; nor for an
        oracle's per-layer mix of trials, each averaged exactly, which has no single ideal."""
        if len(trials) > 1 or self.settings.secure_aggregation:
            return None
        return aggregation_error(self.state, trials[0].accepted, trials[0].weights, new_state)

    def _diagnostics(self, new_state: GlobalState) -> dict[str, Any]:
        """The scores that chose this round's mask beside the realised decrease on the probe set."""
        if self.probe is None:
            return {}
        predicted = self.method.describe(self.state).get("scores", {})  # self.state is still the round's start
        return realised_decrease(self.probe, self.state, new_state) | {"predicted": predicted}

    def _trial(
        self, round_index: int, clients: list[int], mask: Mask, faults: tuple[set[int], set[int]],
        downloads: dict[int, dict[str, torch.Tensor]], done: Callable[[int], None],
    ) -> Trial:
        """The sampled clients train `mask`; the sound updates are averaged into a candidate state."""
        failing, late = faults
        evaluate = self.method.personalised and self._evaluates(round_index)
        jobs = [
            ClientJob(
                client_id=c,
                round_index=round_index,
                seed=_job_seed(self.settings.seed, round_index, c),
                mask=mask,
                statistics=self.method.statistics,
                rank=self.method.client_rank(c),
                fail=c in failing,
                download=downloads[c],
                evaluate=evaluate,
                base=self._synced_round[c],
                lr_multiplier=self.round_lr_multiplier(round_index),
            )
            for c in clients
        ]
        deliveries = self.engine.train(jobs, done)
        received = time.perf_counter()
        results = [d.result for d in deliveries]
        traffic = {
            "bytes_down": {j.client_id: d.bytes_down for j, d in zip(jobs, deliveries, strict=True)},
            "bytes_up": {j.client_id: d.bytes_up for j, d in zip(jobs, deliveries, strict=True) if d.bytes_up},
        }
        accepted, rejected = self._accept(round_index, jobs, results, mask, late)
        clients_s = sum(r.train_time_s for r in results if isinstance(r, ClientUpdate))
        answered = {
            job.client_id for job, r in zip(jobs, results, strict=True)
            if isinstance(r, ClientUpdate) or (isinstance(r, RejectedAfterTraining) and not isinstance(r, NoAnswer))
        }
        if len(accepted) < self.settings.min_clients:
            return Trial(mask, accepted, rejected, clients_s, server_s=time.perf_counter() - received, answered=answered,
                         **traffic)
        weights = self.method.weights(accepted)
        start = time.perf_counter()
        state = self.method.aggregate(self.state, accepted, weights)
        if self.train_head and accepted[0].head:  # a method whose clients keep their heads uploads none
            head = {k: weighted_mean([u.head[k] for u in accepted], weights) for k in self.state.head}
            state = state.evolve(head=head)
        done_at = time.perf_counter()
        return Trial(mask, accepted, rejected, clients_s, weights, state, done_at - start, done_at - received, answered,
                     **traffic)

    def _accept(
        self, round_index: int, jobs: list[ClientJob], results: list[ClientUpdate | Exception], mask: Mask,
        late: set[int],
    ) -> tuple[list[ClientUpdate], list[int]]:
        """The sound updates, and the clients rejected (logged); every client that trained is charged."""
        accepted, rejected = [], []
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, RejectedAfterTraining):
                reason = str(result)
            elif isinstance(result, Exception):
                reason = f"raised {type(result).__name__}: {result}"
            elif job.client_id in late:
                reason = "its update arrived after the round's deadline (simulated straggler)"
            else:
                expected = expected_names(self.state, mask, self.train_head, self.method, job.client_id)
                reason = validate_update(result, self.state, mask, expected, self.method.statistics)
                if reason is None and not self.settings.secure_aggregation:
                    reason = moved_too_far(result, self.state, self.settings.local, self.sizes[job.client_id])
                if reason is None and self.settings.dp_enabled:
                    reason = misreported_cost(result.privacy_history, self._round_cost(job.client_id))
            if reason is None:
                accepted.append(result)
            else:
                rejected.append(job.client_id)
                log.warning("round %d: rejected client %d: %s", round_index, job.client_id, reason)
            trained = not isinstance(result, Exception) or isinstance(result, RejectedAfterTraining)
            if trained and self.settings.dp_enabled:
                # The server charges the cost of the job it sent (sigma, sampling rate, steps),
                # never what a client reports: a client that trained spent it, update kept or not.
                self.histories[job.client_id].extend(self._round_cost(job.client_id))
        return accepted, rejected

    def _bump_versions(self, new_state: GlobalState) -> None:
        old = self.method.downloaded(self.state)
        for name, tensor in self.method.downloaded(new_state).items():
            if name not in old or not torch.equal(tensor, old[name]):
                self._version[name] = self._version.get(name, 0) + 1

    def _record(
        self,
        round_index: int,
        clients: list[int],
        rejected: list[int],
        mask: Mask,
        accepted: list[ClientUpdate],
        times: RoundTimes,
        errors: dict[str, float] | None,
        trials: Sequence[Trial],
    ) -> RoundRecord:
        # Measured by the engines: every trial's download, and the replies of the updates kept.
        ups = [trials[0].bytes_up.get(u.client_id, 0) for u in accepted]
        downs = [sum(t.bytes_down.get(c, 0) for t in trials) for c in clients]
        losses = [u.loss for u in accepted if not math.isnan(u.loss)]
        settings = self.settings
        metrics = self._metrics(accepted) if self._evaluates(round_index) else {}
        return RoundRecord(
            round=round_index,
            clients=clients,
            rejected=rejected,
            mask=mask,
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            examples_seen=sum(u.examples_seen for u in accepted),
            epsilon=max(self.epsilon(c) for c in self.histories) if settings.dp_enabled else None,
            delta=settings.delta,
            agg_error=float(np.mean(list(errors.values()))) if errors else None,
            agg_error_per_layer=errors or {},
            agg_time_s=times.aggregation_s,
            server_time_s=times.server_s,
            client_time_s=times.clients_s,
            bytes_up_per_client=float(np.mean(ups)) if ups else 0.0,
            bytes_down_per_client=float(np.mean(downs)) if downs else 0.0,
            train_loss_by_step=mean_by_step([u.step_losses for u in accepted]),
            lr_multiplier=self.round_lr_multiplier(round_index),
            lr_multiplier_by_step=mean_by_step([u.step_lr_multipliers for u in accepted]),
            metrics=metrics,
            selection=self.method.describe(self.state) if accepted else {},
        )

    def _evaluates(self, round_index: int) -> bool:
        return round_index == self.settings.rounds - 1 or (round_index + 1) % self.settings.eval_every == 0

    def evaluation_state(self) -> GlobalState | None:
        """The model the dev split scores (`Method.evaluation_view`, of the average over rounds where
        federation.ema_decay asks for one); None where there is none."""
        state = self.average.view(self.state) if self.average is not None else self.state
        return self.method.evaluation_view(state, self._kept())

    def _kept(self) -> list[dict[str, torch.Tensor]] | None:
        kept = self.engine.kept_by_clients()
        return None if kept is None else [kept[c] for c in sorted(kept)]

    def _metrics(self, accepted: Sequence[ClientUpdate]) -> dict[str, float]:
        """The dev figures of the evaluation state, and a personalised method's `personal_*` figures:
        the mean over this round's clients of their own models on their held-out splits, weighted
        by those splits' sizes, as each client measured it after training."""
        view = self.evaluation_state()
        metrics = self.evaluate(view) if view is not None else {}
        own = [u.personal_metrics for u in accepted if u.personal_metrics]
        if own:
            sizes = [m["n"] for m in own]
            for name in (k for k in own[0] if k != "n"):
                metrics[f"personal_{name}"] = float(np.average([m[name] for m in own], weights=sizes))
        return metrics

def _job_seed(seed: int, round_index: int, client: int) -> int:
    """A distinct, reproducible seed for each (run, round, client)."""
    return int(np.random.SeedSequence([seed, round_index, client]).generate_state(1)[0])
