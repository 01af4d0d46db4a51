"""Local training of one client for one round: set the global factors, DP-SGD for tau steps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from aslora.adapters import Factors, LoraView
from aslora.memory import return_freed_tensors_to_the_system
from aslora.methods.statistics import kind as statistics_kind
from aslora.privacy import (
    DPSettings,
    TrainingSession,
    mark_empty_batch,
    new_accountant,
    private_training,
    sample_rate,
    update_norm_bound,
    with_head_share,
)
from aslora.protocol import ClientJob, ClientUpdate, GlobalState, Mask
from aslora.selection import floor_g
from aslora.stepsize import a_step_scale

LossFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


@dataclass(frozen=True)
class LocalSettings:
    """How every client trains: the same for all clients of a run."""

    steps: int
    batch_size: int
    lr: float
    optimizer: str
    dp: DPSettings
    accountant: str
    train_head: bool
    micro_batch_size: int = 0  # 0: the logical batch in one pass
    common_rate: float | None = None  # optim.batch_scaling 'by_size': every client samples at this rate
    score_clip_share: float | None = None  # selection.score_clip_share: the inactive factors' part of C^2
    head_clip_share: float | None = None  # privacy.head_clip_share: the trained head's part of C^2
    floor_g: bool = True  # selection.floor_g: upload max(G, 0) (ALGORITHM.md 4.1), else the unbiased G
    a_lr_scale: float = 1.0  # optim.a_lr_scale: the A factors step at lr * a_lr_scale
    a_lr_rule: str = "fixed"  # optim.a_lr_rule: 'balanced' caps each layer's scale at |A| / |B|
    head_lr_scale: float = 1.0  # optim.head_lr_scale: the trained head steps at lr * head_lr_scale
    step_control: str = "none"  # optim.step_control: 'secant' shortens a local step that would overshoot

    def rate(self, n_examples: int) -> float:
        """The Poisson sampling rate q of a client with `n_examples`: the one definition that DP-SGD,
        the accountant, the score's noise variance and the norm bound all use."""
        return self.common_rate if self.common_rate is not None else sample_rate(self.batch_size, n_examples)

    def expected_batch(self, n_examples: int) -> float:
        """q n: the expected Poisson batch of that client, by which DP-SGD divides its summed gradient."""
        return self.rate(n_examples) * n_examples

    def norm_bound(self, n_examples: int, dims: int) -> float:
        """How far one round of this training can move `dims` parameters of a client with `n_examples`."""
        return update_norm_bound(
            self.steps, self.lr * max(1.0, self.a_lr_scale, self.head_lr_scale), self.optimizer, self.dp.clip, self.dp.noise_multiplier,
            self.expected_batch(n_examples), n_examples, dims,
        )


class ClientDropout(RuntimeError):
    """A simulated client fault (federation.dropout)."""


def _batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    """Poisson batches without end: a new pass whenever one is exhausted."""
    while True:
        yield from loader


def _restrict_rank(view: LoraView, rank: int, then: Callable[[], None] | None) -> Callable[[], None]:
    """Zero every component beyond `rank`, and keep it zero: a rank-`rank` adapter inside a rank-r one.

    The padding receives zero gradient (its partner factor is zero) but DP
    noise would move it; the returned hook zeroes that noise before each step
    (post-processing of the privatised gradient).
    """
    padding = [
        (view.parameter(layer, "A"), (slice(rank, None), slice(None))) for layer in view.layers
    ] + [(view.parameter(layer, "B"), (slice(None), slice(rank, None))) for layer in view.layers]
    with torch.no_grad():
        for p, index in padding:
            p[index] = 0

    def hook() -> None:
        if then is not None:
            then()
        for p, index in padding:
            if p.grad is not None:
                p.grad[index] = 0

    return hook


def _logical_step(
    session: TrainingSession, batch: tuple[torch.Tensor, ...], loss_fn: LossFn, settings: LocalSettings
) -> float:
    """One optimiser step over a logical (Poisson) batch, in micro-batches of consecutive rows.

    Under DP, each micro-batch's per-sample gradients are clipped and summed
    by Opacus (a skipped step), and only the last adds the noise, divides by
    the expected batch size, and is accounted: the same step as one pass,
    with memory bounded by the micro-batch. Without DP the gradients of the
    micro-batches' losses, weighted by their share, add up to the batch mean.
    Returns the batch's mean loss.
    """
    size = len(batch[-1])
    chunk = settings.micro_batch_size or size
    starts = range(0, size, chunk)
    total = 0.0
    for start in starts:
        part = tuple(t[start : start + chunk] for t in batch)
        share = len(part[-1]) / size
        loss = loss_fn(session.module, part)
        (loss if settings.dp.enabled else loss * share).backward()
        total += float(loss.detach()) * share
        if start + chunk < size and settings.dp.enabled:
            session.optimizer.signal_skip_step(do_skip=True)
            session.optimizer.step()  # clips and accumulates this micro-batch, takes no step
            session.optimizer.zero_grad(set_to_none=True)
    session.step()
    return total


def train_client(
    view: LoraView,
    data: TensorDataset,
    state: GlobalState,
    job: ClientJob,
    settings: LocalSettings,
    loss_fn: LossFn,
) -> ClientUpdate:
    """Run `settings.steps` DP-SGD steps from the global state; return what was trained.

    What joins the per-sample gradient, what is measured for the server and
    how the clip budget is split follow the job's statistics kind
    (methods/statistics.py).
    """
    if job.fail:
        raise ClientDropout(f"client {job.client_id} dropped out in round {job.round_index} (simulated)")
    return_freed_tensors_to_the_system()
    started = time.perf_counter()
    _load_state(view, state)
    rule = statistics_kind(job.statistics).prepare(view, job.mask, settings.train_head, settings.score_clip_share)
    on_gradient = rule.on_gradient if job.rank is None else _restrict_rank(view, job.rank, rule.on_gradient)
    clip_groups = rule.clip_groups
    if settings.head_clip_share is not None:
        clip_groups = with_head_share(clip_groups, rule.params, list(view.head.values()), settings.head_clip_share)
    torch.manual_seed(job.seed)  # dropout inside the model
    generator = torch.Generator().manual_seed(job.seed)
    accountant = new_accountant(settings.accountant)
    scales = {
        id(view.parameter(layer, "A")): a_step_scale(
            settings.a_lr_rule, settings.a_lr_scale, view.parameter(layer, "A"), view.parameter(layer, "B")
        )
        for layer in view.layers
    }
    scales |= {id(p): settings.head_lr_scale for p in view.head.values()}
    with private_training(
        view.model, rule.params, data, settings.rate(len(data)), settings.optimizer, settings.lr * job.lr_multiplier,
        settings.dp,
        accountant, generator, on_gradient, clip_groups,
        lr_scales=[scales.get(id(p), 1.0) for p in rule.params],
        step_control=settings.step_control,
    ) as session:
        step_losses, seen = _local_steps(session, rule.params, loss_fn, settings)
        stats = rule.statistics(session.noise_variance)
        control = session.control
        lr_multipliers = [job.lr_multiplier * m for m in control.multipliers] if control is not None else []
    return ClientUpdate(
        client_id=job.client_id,
        n_examples=len(data),
        factors=_trained_factors(view, job.mask),
        head=view.get_head() if settings.train_head else {},
        examples_seen=seen,
        step_losses=step_losses,
        step_lr_multipliers=lr_multipliers,
        privacy_history=list(accountant.history),
        stats=floor_g(stats) if settings.floor_g else stats,
        train_time_s=time.perf_counter() - started,
    )


def _load_state(view: LoraView, state: GlobalState) -> None:
    """Put the global factors, head and folded residuals into the client's model."""
    view.set_factors(state.factors)
    view.set_head(state.head)
    view.set_residual(state.residual)


def _local_steps(
    session: TrainingSession, params: list[torch.nn.Parameter], loss_fn: LossFn, settings: LocalSettings
) -> tuple[list[float | None], int]:
    """`settings.steps` DP-SGD steps on Poisson batches: each step's mean loss (None for an empty
    batch), and the examples seen.

    An empty Poisson batch is still a step under DP (noise only, accounted)."""
    session.module.train()
    batches = _batches(session.loader)
    losses: list[float | None] = []
    seen = 0
    for _ in range(settings.steps):
        batch = next(batches)
        session.optimizer.zero_grad(set_to_none=True)
        size = len(batch[-1])
        if size == 0:
            if settings.dp.enabled:
                mark_empty_batch(params)
                session.step()
            losses.append(None)
            continue
        losses.append(_logical_step(session, batch, loss_fn, settings))
        seen += size
    return losses, seen


def _trained_factors(view: LoraView, mask: Mask) -> Factors:
    """Copies of the factors the round trained: what the client uploads."""
    return {
        layer: {f: view.parameter(layer, f).detach().clone() for f in factors}
        for layer, factors in mask.items()
        if factors
    }
