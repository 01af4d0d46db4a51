"""DP-SGD on one client with Opacus, and the per-client privacy accountant.

Opacus is attached afresh for every client round: which parameters are
trainable may change between rounds, and Opacus breaks if `requires_grad`
changes while its hooks are attached (IndexError in hooks mode, a clip over
the wrong parameters in ghost mode). Re-attaching costs a few milliseconds.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import Dataset

from aslora.stepsize import CONTROLS, SecantStepControl


@dataclass(frozen=True)
class DPSettings:
    """What DP-SGD needs on a client; `enabled=False` trains with plain SGD."""

    enabled: bool
    noise_multiplier: float
    clip: float


# Opacus's default RDP orders stop at 63; with the small sampling rates and few
# steps of federated clients the optimal order is often higher, and the default
# then overstates epsilon (with a warning). Extending the orders tightens it.
RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS) + tuple(range(64, 256, 4)) + (256, 384, 512, 1024)


def _epsilon_options(accountant: str | IAccountant) -> dict[str, object]:
    kind = accountant if isinstance(accountant, str) else accountant.mechanism()
    return {"alphas": list(RDP_ORDERS)} if kind == "rdp" else {}


def new_accountant(kind: str) -> IAccountant:
    """An empty Opacus accountant ('rdp' or 'prv'): one per client."""
    return create_accountant(mechanism=kind)


def restore_accountant(kind: str, history: Sequence[Sequence[float]]) -> IAccountant:
    """An accountant with a recorded (sigma, q, steps) history."""
    accountant = new_accountant(kind)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def spent_epsilon(accountant: IAccountant, delta: float) -> float:
    """The epsilon this accountant has spent at `delta` (0 before any step)."""
    if not accountant.history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in accountant.history):
        return math.inf  # a noiseless step releases the data: no finite guarantee
    if accountant.mechanism() == "rdp":
        return _rdp_epsilon(accountant.history, delta)
    return float(accountant.get_epsilon(delta=delta, **_epsilon_options(accountant)))


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(sigma: float, q: float) -> np.ndarray:
    try:
        return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS)))
    except (ZeroDivisionError, OverflowError):  # a sigma so small (1e-300) that 1 / sigma^2 overflows
        return np.full(len(RDP_ORDERS), np.inf)


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus's RDP epsilon, with the per-step RDP of each (sigma, q) cached.

    The server re-evaluates every client's epsilon every round; RDP composes
    additively, so caching one step's RDP per (sigma, q) gives Opacus's exact
    computation at a fraction of the cost (it is otherwise O(order) per order).
    """
    rdp = sum(steps * _rdp_of_one_step(float(sigma), float(q)) for sigma, q, steps in history)
    if not np.isfinite(rdp).any():
        return math.inf
    epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest sigma that keeps `steps` Poisson-sampled steps within (epsilon, delta).

    Cached: Opacus's bisection takes about 9 s on 2 cores, and a `compare` of several methods (or
    an engine that plans each round in a fresh process) plans the same budget again and again."""
    check_accounting(delta, sample_rate, steps)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number above 0 (got {epsilon}); e.g. 3")
    with warnings.catch_warnings():
        # The bisection probes very large sigmas whose optimal RDP order lies past
        # any finite list; their epsilons are far below target, so the bound's
        # looseness there cannot change the answer.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # Probes near sigma 0 overflow numpy on the way to the ZeroDivisionError reported below.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    # Opacus bisects until |epsilon - target| < tolerance (0.01 by default): past
                    # epsilon 1e14 a float's spacing exceeds that and the search never ends
                    epsilon_tolerance=max(0.01, 1e-4 * epsilon),
                    **_epsilon_options(accountant),
                )
            )
        except ValueError as exc:  # Opacus: "The privacy budget is too low." past sigma 2,000 or so
            raise ValueError(
                f"epsilon {epsilon} is out of reach at sample rate {sample_rate:g} over {steps} steps "
                f"(delta {delta:g}): no noise multiplier Opacus searches gets there ({exc}). Raise epsilon, "
                "or take fewer steps or a lower sample rate"
            ) from None
        except (ZeroDivisionError, OverflowError) as exc:  # Opacus's bisection: sigma so small that sigma^2 underflows
            raise ValueError(
                f"epsilon {epsilon} at sample rate {sample_rate:g} over {steps} steps (delta {delta:g}) needs almost no "
                f"noise: Opacus's search for sigma fails near 0 ({type(exc).__name__}). Lower epsilon, or give the "
                "noise multiplier itself"
            ) from None


def epsilon_for(sigma: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The epsilon of `steps` DP-SGD steps with noise `sigma` at rate `sample_rate` (inf for sigma 0)."""
    check_accounting(delta, sample_rate, steps)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"the noise multiplier sigma must be a finite number >= 0 (got {sigma}); e.g. 1.0")
    if sigma == 0:
        return math.inf
    return spent_epsilon(restore_accountant(accountant, [(sigma, sample_rate, steps)]), delta)


def calibrate_continuation(
    history: Sequence[tuple[float, float, int]],
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> float:
    """The smallest sigma for `steps` more steps at `sample_rate` after `history`, within `epsilon`.

    Opacus calibrates a single (q, steps) from nothing; a run extended after
    some rounds composes its past with the steps to come, so this bisects
    on the composed epsilon itself (40 halvings of [1e-3, 2000]: bounded time,
    sigma to 1e-10 relative). Raises ValueError where the past leaves no room
    below sigma 2,000, where Opacus's own calibration gives up too.
    """
    check_accounting(delta, sample_rate, steps)

    def spent(sigma: float) -> float:
        return spent_epsilon(restore_accountant(accountant, [*history, (sigma, sample_rate, steps)]), delta)

    past = spent_epsilon(restore_accountant(accountant, history), delta) if history else 0.0
    low, high = 1e-3, 2000.0
    if past >= epsilon or spent(high) > epsilon:
        raise ValueError(
            f"the steps taken so far spend epsilon {past:.4g} of the budget {epsilon:g}: no noise leaves "
            f"room for {steps} more steps"
        )
    if spent(low) <= epsilon:
        return low
    for _ in range(40):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if spent(middle) <= epsilon else (middle, high)
    return high


def check_accounting(delta: float, sample_rate: float, steps: int) -> None:
    """What every accountant query needs: 0 < delta < 1, 0 < q <= 1 and at least one step, all finite
    (a NaN would make the searches for sigma or epsilon run forever)."""
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must lie strictly between 0 and 1 (got {delta}); e.g. 1e-5")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"the sample rate q = b / n must lie in (0, 1] (got {sample_rate})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1 (got {steps!r})")


def sample_rate(batch_size: int, n_examples: int) -> float:
    """Poisson rate q = b / n, capped at 1."""
    return min(1.0, batch_size / n_examples)


# A client's optimiser starts afresh every round (no state crosses rounds).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


@dataclass
class TrainingSession:
    """The pieces one client round trains with."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DPDataLoader
    sample_rate: float
    noise_variance: float  # nu = (sigma C / b)^2 per coordinate of one step's gradient
    on_gradient: Callable[[], None] | None = None
    control: SecantStepControl | None = None  # optim.step_control: its multipliers, step by step

    def step(self) -> None:
        """Apply the step; `on_gradient` first sees the gradient as it will be applied.

        With DP that is the clipped, noised, averaged gradient (Opacus calls the
        hook after adding noise); without DP, the plain gradient.
        """
        if self.on_gradient is not None and not isinstance(self.optimizer, DPOptimizer):
            self.on_gradient()
        self.optimizer.step()


ClipGroups = Sequence[tuple[Sequence[torch.nn.Parameter], float]]  # (parameters, their share of C^2)


def with_head_share(
    groups: ClipGroups | None, params: Sequence[torch.nn.Parameter], head: Sequence[torch.nn.Parameter], share: float
) -> ClipGroups:
    """`groups` (None: every one of `params` in one group) with the trained `head` taken out into a group of its
    own at `share` of C^2, the others scaled to the remaining 1 - share.

    Why: a zero head's per-example gradient is |p - y| |x|, with |x| 4-6 for MiniLM's mean-pooled
    embedding, so under one joint clip it fills C^2 and the adapters' gradient is scaled to little.
    """
    ids = {id(p) for p in head}
    trained = [p for p in params if id(p) in ids]
    if not trained:
        raise ValueError("privacy.head_clip_share needs the head among the trained parameters (lora.train_head)")
    base = groups if groups is not None else [(params, 1.0)]
    rest = [([p for p in ps if id(p) not in ids], part * (1 - share)) for ps, part in base]
    return [*rest, (trained, share)]


class GroupClipDPOptimizer(DPOptimizer):
    """DP-SGD whose per-example clip is split over groups of parameters: group k is clipped to
    C sqrt(share_k), the shares summing to 1.

    Every example's whole gradient still has norm at most C, so DPOptimizer's
    noise of std sigma C and the accountant's (sigma, q) are exactly DP-SGD's.
    Opacus clips either all parameters jointly (DPOptimizer) or each one alone
    (DPPerLayerOptimizer); groups of several parameters lie between, hence
    this subclass, which changes the clipping only.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, groups: ClipGroups, max_grad_norm: float, **kwargs: object
    ) -> None:
        super().__init__(optimizer, max_grad_norm=max_grad_norm, **kwargs)
        grouped = [id(p) for params, _ in groups for p in params]
        if sorted(grouped) != sorted(id(p) for p in self.params) or not math.isclose(sum(s for _, s in groups), 1.0):
            raise ValueError("clip groups must hold every trained parameter once, with shares summing to 1")
        self.clip_groups = [(list(params), max_grad_norm * math.sqrt(share)) for params, share in groups]

    def clip_and_accumulate(self) -> None:
        for params, threshold in self.clip_groups:
            if not params:
                continue
            for p in params:
                _check_processed_flag(p.grad_sample)
            samples = [self._get_flat_grad_sample(p) for p in params]
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
            factor = (threshold / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(params, samples, strict=True):
                clipped = torch.einsum("i,i...", factor.to(p.dtype), g.to(p.dtype))
                p.summed_grad = clipped if p.summed_grad is None else p.summed_grad + clipped
                _mark_as_processed(p.grad_sample)


@contextmanager
def private_training(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    dataset: Dataset,
    rate: float,
    optimizer_name: str,
    lr: float,
    dp: DPSettings,
    accountant: IAccountant,
    generator: torch.Generator,
    on_gradient: Callable[[], None] | None = None,
    clip_groups: ClipGroups | None = None,
    lr_scales: Sequence[float] = (),
    step_control: str = "none",
) -> Iterator[TrainingSession]:
    """Attach Opacus to `model` for one round; detach and clean up afterwards.

    The data loader always Poisson-samples at `rate` so that DP and non-DP
    runs see the same batches. With DP on, every optimiser step clips each
    example's gradient over `params` jointly to `dp.clip`, adds Gaussian noise
    of std `sigma * clip`, divides by the expected batch size, and records the
    step in `accountant`. `on_gradient` runs on every step's final gradient,
    before the optimiser applies it. With `clip_groups` the clip is split
    over groups of `params` (GroupClipDPOptimizer), at the same sigma. With `lr_scales`,
    `params[i]` steps at `lr * lr_scales[i]` (LoRA+); the privatised gradient does not depend on it.
    `step_control` ('secant', 'secant_decay') shortens each step after the first from the gradients released so
    far (stepsize.py), after `on_gradient` has seen the gradient.
    """
    scales = list(lr_scales) or [1.0] * len(params)
    if len(scales) != len(params):
        raise ValueError(f"{len(scales)} lr scales for {len(params)} parameters: give one per parameter")
    loader = DPDataLoader(dataset, sample_rate=rate, generator=generator)
    # PEFT's create_loraplus_optimizer groups by parameter name over the whole model; a client
    # trains a per-round subset of it, so the groups are formed here from that subset.
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p, scale in zip(params, scales, strict=True):
        groups.setdefault(scale, []).append(p)
    optimizer = OPTIMIZERS[optimizer_name]([{"params": ps, "lr": lr * scale} for scale, ps in groups.items()])
    if not dp.enabled:
        control = _control(step_control, optimizer, 0.0)
        yield TrainingSession(model, optimizer, loader, rate, 0.0, _then(on_gradient, control), control)
        return
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer_class = (
        DPOptimizer if clip_groups is None else functools.partial(GroupClipDPOptimizer, groups=clip_groups)
    )
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clip,
        # q n exactly (Opacus's own make_private rounds it down to an int, which would make
        # the noise std and the mean differ from what nu and the norm bound assume)
        expected_batch_size=len(dataset) * rate,
        generator=generator,
    )
    account = accountant.get_optimizer_hook_fn(sample_rate=rate)
    nu = (dp.noise_multiplier * dp.clip / dp_optimizer.expected_batch_size) ** 2
    control = _control(step_control, optimizer, nu)
    then = _then(on_gradient, control)

    def after_noise(optim: DPOptimizer) -> None:  # Opacus holds a single step hook
        account(optim)
        if then is not None:
            then()

    dp_optimizer.attach_step_hook(after_noise)
    try:
        yield TrainingSession(wrapped, dp_optimizer, loader, rate, nu, then, control)
    finally:
        wrapped.to_standard_module()
        for p in params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None


def _control(name: str, optimizer: torch.optim.Optimizer, nu: float) -> SecantStepControl | None:
    if name not in CONTROLS:
        raise ValueError(f"unknown step control {name!r}; choose one of {', '.join(CONTROLS)}")
    return None if name == "none" else SecantStepControl(optimizer, nu)  # the decay is the server's part


def _then(first: Callable[[], None] | None, second: Callable[[], None] | None) -> Callable[[], None] | None:
    """`first`, then `second`, each where given."""
    if first is None or second is None:
        return first or second

    def both() -> None:
        first()
        second()

    return both


def update_norm_bound(
    steps: int,
    lr: float,
    optimizer: str,
    clip: float,
    noise_multiplier: float,
    batch_size: float,
    n_examples: int,
    dims: int,
    failure: float = 1e-9,
) -> float:
    """How far `steps` DP-SGD steps can move `dims` parameters (L2), except with probability `failure`.

    SGD: a step moves lr ||g||, g = (sum of at most |B| clipped gradients + N(0, (sigma C)^2 I)) / b,
    with |B| ~ Binomial(n, b/n) bounded by Chernoff and the noise norm by sqrt(dims) + t
    (Gaussian concentration), each failing with probability failure / (2 steps).
    Adam: whatever the gradients, Cauchy-Schwarz bounds each coordinate's step
    |m_hat / sqrt(v_hat)| by kappa_t (below), so the round moves at most lr sqrt(dims) sum_t kappa_t.
    """
    if optimizer == "adam":
        beta1, beta2 = 0.9, 0.999  # torch.optim.Adam's defaults, which clients use
        kappas = [
            (1 - beta1) / (1 - beta1**t) * math.sqrt((1 - beta2**t) / (1 - beta2))
            * math.sqrt(sum((beta1**2 / beta2) ** k for k in range(t)))
            for t in range(1, steps + 1)
        ]
        return lr * math.sqrt(dims) * sum(kappas)
    log_term = math.log(2 * steps / failure)
    mean = min(batch_size, n_examples)
    delta = (log_term + math.sqrt(log_term**2 + 8 * mean * log_term)) / (2 * mean)
    examples = min(n_examples, (1 + delta) * mean)
    noise = noise_multiplier * clip * (math.sqrt(dims) + math.sqrt(2 * log_term))
    return steps * lr * (examples * clip + noise) / batch_size


def mark_empty_batch(params: list[torch.nn.Parameter]) -> None:
    """Give every parameter an empty per-sample gradient.

    A Poisson batch may be empty; DP-SGD must still take the (noise-only) step
    so that the accountant's step count stays true.
    """
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
