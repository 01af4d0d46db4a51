"""One experiment from a validated config: data, model, clients, privacy plan, rounds, results."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from rich.progress import Progress
from torch.utils.data import TensorDataset

from aslora.adapters import LoraView
from aslora.checkpoint import Checkpoint, load_checkpoint, remove_debris, save_checkpoint
from aslora.client import LocalSettings
from aslora.config import ConfigError, ExperimentConfig, parse_config
from aslora.diagnostics import mean_loss
from aslora.engines.local import LocalEngine
from aslora.methods import Method, MethodContext, get_method
from aslora.model_average import ModelAverage
from aslora.partition import hold_out, partition, set_apart
from aslora.privacy import (
    DPSettings,
    calibrate_continuation,
    calibrate_noise,
    epsilon_for,
    restore_accountant,
    spent_epsilon,
)
from aslora.protocol import GlobalState
from aslora.results import RunDirectory
from aslora.server import Engine, Federation, RoundRecord, ServerSettings
from aslora.server_optimizer import ServerOptimizer
from aslora.tasks import Task, load_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyPlan:
    """The noise every client trains with, and what it buys over the planned steps."""

    enabled: bool
    noise_multiplier: float
    max_sample_rate: float
    planned_steps: int
    planned_epsilon: float | None
    delta: float
    budget: float | None
    # (first round, sigma) of every segment: a run extended with `--resume --rounds` has several
    segments: tuple[tuple[int, float], ...] = ()

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of the plan: it is the record a resume continues from."""
        return {"segments": [list(s) for s in self.segments], "planned_epsilon": self.planned_epsilon,
                "planned_steps": self.planned_steps}

    def restored(self, record: dict[str, Any]) -> PrivacyPlan:
        """This plan with the sigma, steps and epsilon a checkpoint recorded."""
        segments = tuple((int(first), float(sigma)) for first, sigma in record["segments"])
        return replace(self, noise_multiplier=segments[-1][1], segments=segments,
                       planned_epsilon=record["planned_epsilon"], planned_steps=record["planned_steps"])


def planned_steps(config: ExperimentConfig, rounds: int) -> int:
    """The DP-SGD steps of the most exposed client over `rounds`: its expected participations,
    rounds * m / N rounded up, times the local steps."""
    fed = config.federation
    return fed.local_steps * math.ceil(rounds * fed.clients_per_round / config.data.num_clients)


def plan_privacy(config: ExperimentConfig, client_sizes: list[int], local: LocalSettings) -> PrivacyPlan:
    """Calibrate sigma for the most exposed client (largest q) over its expected steps.

    A client's expected participations are rounds * m / N (rounded up); the
    server enforces the budget at run time for clients sampled more often.
    Refuses a directly given sigma that would exceed the configured budget.
    """
    p = config.privacy
    steps = planned_steps(config, config.federation.rounds)
    q = max(local.rate(n) for n in client_sizes)
    if not p.enabled:
        return PrivacyPlan(False, 0.0, q, steps, None, p.delta, None, ((0, 0.0),))
    smallest = min(client_sizes)
    if p.delta >= 1 / smallest:
        # (epsilon, delta)-DP with delta >= 1/n allows publishing one of n examples outright.
        raise ConfigError(
            f"privacy.delta={p.delta:g} is not below 1/n of the smallest client (n = {smallest}, 1/n = "
            f"{1 / smallest:.3g}): such a delta allows releasing an example in the clear; set delta well "
            f"below 1/n, e.g. 1e-5"
        )
    if p.noise_multiplier is not None:
        sigma = p.noise_multiplier
        planned = epsilon_for(sigma, p.delta, q, steps, p.accountant)
        if p.epsilon is not None and planned > p.epsilon:
            raise ConfigError(
                f"privacy.noise_multiplier={sigma} spends epsilon={planned:.3g} over the planned "
                f"{steps} steps, above the budget privacy.epsilon={p.epsilon}; raise the noise, "
                "lower rounds or local_steps, or drop noise_multiplier to calibrate it"
            )
    else:
        assert p.epsilon is not None  # guaranteed by the config validator
        try:
            sigma = calibrate_noise(p.epsilon, p.delta, q, steps, p.accountant)
        except ValueError as exc:
            raise ConfigError(f"privacy.epsilon: {exc} (federation.rounds, local_steps, optim.batch_size)") from None
        planned = epsilon_for(sigma, p.delta, q, steps, p.accountant)
    return PrivacyPlan(True, sigma, q, steps, planned, p.delta, p.epsilon, ((0, sigma),))


def extend_privacy(plan: PrivacyPlan, config: ExperimentConfig, rounds_done: int) -> PrivacyPlan:
    """The plan of a run extended, after `rounds_done` rounds, to config.federation.rounds.

    The rounds done keep the sigma their segments used; the rounds to come
    get the smallest sigma that keeps the most exposed client's planned steps
    within the stored budget (privacy.epsilon). A noise_multiplier given
    without a budget stays, and the planned epsilon grows.
    """
    if not plan.enabled:
        return plan
    p, q = config.privacy, plan.max_sample_rate
    ends = [first for first, _ in plan.segments[1:]] + [rounds_done]
    history = [
        (sigma, q, planned_steps(config, end) - planned_steps(config, first))
        for (first, sigma), end in zip(plan.segments, ends, strict=True)
    ]
    history = [h for h in history if h[2] > 0]
    steps = planned_steps(config, config.federation.rounds) - planned_steps(config, rounds_done)
    if p.noise_multiplier is not None or p.epsilon is None:
        sigma = plan.noise_multiplier  # a given sigma is kept (plan_privacy checked it against any budget)
    else:
        try:
            sigma = calibrate_continuation(history, p.epsilon, p.delta, q, steps, p.accountant)
        except ValueError as exc:
            raise ConfigError(
                f"--rounds {config.federation.rounds}: {exc} (privacy.epsilon = {p.epsilon}); the budget "
                "cannot grow inside a run: start a new run with a larger privacy.epsilon"
            ) from None
    if sigma > 4 * plan.segments[0][1]:
        log.warning(
            "the budget left after %d rounds buys sigma %.4g for the %d rounds to come, %.0fx the first "
            "segment's: they will add mostly noise", rounds_done, sigma, config.federation.rounds - rounds_done,
            sigma / plan.segments[0][1],
        )
    full = [*history, (sigma, q, steps)]
    planned = spent_epsilon(restore_accountant(p.accountant, full), p.delta)
    kept = tuple(s for s in plan.segments if s[0] < rounds_done)
    return replace(
        plan, noise_multiplier=sigma, planned_steps=sum(h[2] for h in full), planned_epsilon=planned,
        segments=(*kept, (rounds_done, sigma)),
    )


def method_context(config: ExperimentConfig, privacy: PrivacyPlan) -> MethodContext:
    """The run as methods see it: selection settings, step size, local steps, DP noise, seed."""
    # the nominal expected batch (with batch_scaling "by_size", the mean over clients)
    noise_std = privacy.noise_multiplier * config.privacy.clip / config.optim.batch_size
    return MethodContext(
        selection=config.selection,
        eta=config.optim.lr,
        a_lr_scale=config.optim.a_lr_scale,
        a_lr_rule=config.optim.a_lr_rule,
        tau=config.federation.local_steps,
        nu=noise_std**2 if privacy.enabled else 0.0,
        seed=config.seed,
        rounds=config.federation.rounds,
        client_ranks=config.lora.client_ranks,
    )


LONG_RUN_S = 3600.0  # runs projected past this get a warning after their first round


def warn_if_long(first_round_s: float, rounds: int) -> float:
    """The run's projected wall time from its first round; a warning when it passes LONG_RUN_S.

    Measured rather than modelled: it holds for any task, model and machine.
    """
    projected = first_round_s * rounds
    if projected > LONG_RUN_S:
        log.warning(
            "the first round took %.0f s: %d rounds will take about %.1f h on this machine; "
            "use fewer rounds, clients per round, local steps or a smaller model, or a faster machine",
            first_round_s, rounds, projected / 3600,
        )
    return projected


@dataclass
class RunResult:
    directory: Path
    summary: dict[str, Any]
    records: list[RoundRecord]


@dataclass
class Setup:
    """What a run derives from its config: the same on the server and on every client."""

    config: ExperimentConfig
    task: Task
    shards: list[datasets.Dataset]
    held_out: list[datasets.Dataset]
    privacy: PrivacyPlan
    view: LoraView
    local: LocalSettings
    initial: GlobalState  # the seeded initial state, which the server and every client build for themselves
    probe: datasets.Dataset | None = None  # the server's probe set (data.probe_size), set apart before partitioning

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.shards]

    def local_engine(self, kind: type[LocalEngine] = LocalEngine) -> LocalEngine:
        """This run's in-process engine (`kind`: a subclass of it, as tests use)."""
        return kind(
            self.view, self.task, self.shards, self.held_out, self.local, self.method(), self.initial.tensors(),
            self.config.optim.eval_batch_size,
        )

    def method(self) -> Method:
        return get_method(self.config.method, method_context(self.config, self.privacy))

    def resumed(self, checkpoint: Checkpoint, extending: bool) -> Setup:
        """This setup with the privacy plan its checkpoint recorded (extended where asked): the noise
        a resumed run trains with is the one its record says, never a fresh calibration."""
        plan = self.privacy if checkpoint.privacy is None else self.privacy.restored(checkpoint.privacy)
        if extending:
            plan = extend_privacy(plan, self.config, checkpoint.rounds_done)
        dp = DPSettings(plan.enabled, plan.noise_multiplier, self.config.privacy.clip)
        return replace(self, privacy=plan, local=replace(self.local, dp=dp))


def local_settings(config: ExperimentConfig, client_sizes: list[int], dp: DPSettings) -> LocalSettings:
    """How every client trains; with optim.batch_scaling 'by_size', one sampling rate for all."""
    common = None
    if config.optim.batch_scaling == "by_size":
        mean = sum(client_sizes) / len(client_sizes)
        if config.optim.batch_size >= mean:
            raise ConfigError(
                f"optim.batch_scaling='by_size': optim.batch_size={config.optim.batch_size} is not below the "
                f"mean client size {mean:.0f}, so the sampling rate would reach 1: lower batch_size"
            )
        common = config.optim.batch_size / mean
    return LocalSettings(
        steps=config.federation.local_steps,
        batch_size=config.optim.batch_size,
        lr=config.optim.lr,
        optimizer=config.optim.optimizer,
        dp=dp,
        accountant=config.privacy.accountant,
        train_head=config.lora.train_head,
        micro_batch_size=config.optim.micro_batch_size,
        common_rate=common,
        score_clip_share=config.selection.score_clip_share,
        head_clip_share=config.privacy.head_clip_share,
        floor_g=config.selection.floor_g,
        a_lr_scale=config.optim.a_lr_scale,
        a_lr_rule=config.optim.a_lr_rule,
        head_lr_scale=config.optim.head_lr_scale,
        step_control=config.optim.step_control,
    )


def prepare(config: ExperimentConfig) -> Setup:
    """Data, client shards, privacy plan, model and client settings, all from the seed."""
    if config.per_method:
        raise ConfigError(
            f"per_method tables ({', '.join(config.per_method)}) are not applied yet: run "
            f"config.for_method({config.method!r}) first, as the command line does"
        )
    task = load_task(config)
    train, probe = set_apart(task.train, config.data.probe_size, config.seed)
    shards = partition(train, config.data, config.seed, min_size=config.optim.batch_size)
    shards, held_out = hold_out(shards, config.data.holdout_fraction, config.seed)
    sizes = [len(s) for s in shards]
    local = local_settings(config, sizes, DPSettings(False, 0.0, config.privacy.clip))
    privacy = plan_privacy(config, sizes, local)
    local = replace(local, dp=DPSettings(privacy.enabled, privacy.noise_multiplier, config.privacy.clip))
    view = LoraView(task.build_model(config))
    check_rank(view, config.lora.r)
    initial = GlobalState(
        factors=view.get_factors(), head=view.get_head(), scaling={layer: view.scaling(layer) for layer in view.layers}
    )
    return Setup(config, task, shards, held_out, privacy, view, local, initial, probe)


def check_rank(view: LoraView, rank: int) -> None:
    """A rank above an adapted layer's smaller dimension adds only redundant directions."""
    widths = {layer: min(view.base_weight(layer).shape) for layer in view.layers}
    layer, narrowest = min(widths.items(), key=lambda item: item[1])
    if rank > narrowest:
        raise ConfigError(
            f"lora.r={rank} exceeds the smaller dimension of adapted layer {layer} ({narrowest}): BA cannot "
            f"have rank above {narrowest}; set lora.r <= {narrowest}"
        )


def check_resumable(
    run_dir: RunDirectory, checkpoint: Checkpoint | None, config: ExperimentConfig, extending: bool = False
) -> None:
    """Refuse a resume that would lose rounds or mix settings: the checkpoint is the record.

    An extension (`extending`) may find federation.rounds already changed in
    one of the two files: it was stopped between writing them.
    """
    metrics = run_dir.path / "metrics.jsonl"
    done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    if checkpoint is None and done:
        raise ConfigError(
            f"{run_dir.path} has {done} rounds in metrics.jsonl but no checkpoint.json: resuming would start "
            "again at round 0 and overwrite them. Move the directory away to start afresh"
        )
    if checkpoint is None or checkpoint.config is None:
        return  # nothing done yet, or a checkpoint older than this record: nothing to check against
    # Read through today's schema, a setting added since the checkpoint was written counts as its
    # default: such a run resumes, and only a value that really changed is refused.
    recorded = parse_config(checkpoint.config).model_dump(mode="json")
    current = config.model_dump(mode="json")
    if extending:  # an extension changes the rounds and nothing else
        current["federation"]["rounds"] = recorded["federation"]["rounds"]
    changed = _differences(recorded, current)
    if changed:
        raise ConfigError(
            f"{run_dir.path / 'config.json'} no longer matches the settings the run's checkpoint was made with: "
            f"{', '.join(changed)}. A run continues with the settings it started with: restore config.json "
            "(more rounds: `aslora run --resume DIR --rounds N`), or start a new run"
        )


def extended(config: ExperimentConfig, checkpoint: Checkpoint | None, rounds: int) -> ExperimentConfig:
    """`config` with `rounds` rounds, for a run that continues past the rounds it planned."""
    if checkpoint is None or checkpoint.privacy is None:
        raise ConfigError(
            "--rounds with --resume extends a run from its checkpoint's privacy record, and this run has "
            "none (no round done yet, or an older checkpoint): resume it without --rounds"
        )
    planned = checkpoint.config["federation"]["rounds"] if checkpoint.config else config.federation.rounds
    if rounds <= planned:
        raise ConfigError(
            f"--rounds {rounds}: the run already plans {planned} rounds; --rounds extends it past them "
            "(to finish an interrupted run, resume without --rounds)"
        )
    return config.with_overrides({"federation.rounds": rounds})


def _differences(before: Any, after: Any, prefix: str = "") -> list[str]:
    """'key (old -> new)' for every dotted key whose value differs."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after))
        return [d for k in keys for d in _differences(before.get(k), after.get(k), f"{prefix}{k}.")]
    return [] if before == after else [f"{prefix.rstrip('.')} ({before!r} -> {after!r})"]


class RunDirectoryError(ValueError):
    """The run directory could not be written; the message names the file and how to go on."""


def run_experiment(
    config: ExperimentConfig,
    progress: Progress | None = None,
    engine: Callable[[Setup], Engine] = Setup.local_engine,
    resume: Path | None = None,
    extend_to: int | None = None,
) -> RunResult:
    """Run every round of `config` over `engine` (in-process by default) and write its run directory.

    The federation is checkpointed after every round; with `resume` (a run
    directory) the run continues from its last checkpoint, in that directory,
    and with `extend_to` it goes on to that many rounds, its noise re-planned
    within the stored budget (`extend_privacy`). A write that fails (a full
    disk, a directory made read-only mid-run) is a RunDirectoryError.
    """
    try:
        return _run_experiment(config, progress, engine, resume, extend_to)
    except OSError as exc:
        written = Path(exc.filename) if exc.filename else None
        roots = [Path(config.output_dir).resolve()] + ([resume.resolve()] if resume is not None else [])
        if written is None or not any(written.resolve().is_relative_to(root) for root in roots):
            raise
        run = next((p for p in [written, *written.parents] if (p / "config.json").is_file()), None)
        then = (
            f"{run} keeps the checkpoint of its last finished round: then `aslora run --resume {run}`"
            if run is not None and (run / "checkpoint.json").is_file() else "then run it again"
        )
        raise RunDirectoryError(
            f"cannot write {written} ({exc.strerror or exc}): free space or make it writable; {then}"
        ) from None


def _run_experiment(
    config: ExperimentConfig,
    progress: Progress | None,
    engine: Callable[[Setup], Engine],
    resume: Path | None,
    extend_to: int | None,
) -> RunResult:
    started = time.perf_counter()
    config, checkpoint = _checked_resume(config, resume, extend_to)
    setup = prepare(config)
    if checkpoint is not None:
        setup = setup.resumed(checkpoint, extending=extend_to is not None)
    privacy = setup.privacy
    log.info("noise multiplier %.4f for epsilon %s over %d steps", privacy.noise_multiplier, privacy.planned_epsilon, privacy.planned_steps)
    method = setup.method()
    evaluator = Evaluator(setup)
    runner = engine(setup)
    federation = _federation(setup, method, runner, evaluator)
    run_dir = _run_directory(setup, resume, extend_to)
    if checkpoint is not None:
        federation.state = checkpoint.state
        federation.restore(checkpoint.server)
        if checkpoint.clients:
            runner.restore_kept(checkpoint.clients)
        initial = checkpoint.initial_metrics
        log.info("resuming %s after round %d", run_dir.path, checkpoint.rounds_done)
    else:
        view = federation.evaluation_state()
        initial = evaluator.evaluate(view) if view is not None else {}
    first_round = checkpoint.rounds_done if checkpoint is not None else 0
    earlier_s = checkpoint.wall_s if checkpoint is not None else 0.0  # the segments before a resume

    def save(rounds_done: int) -> None:
        save_checkpoint(
            run_dir.path,
            Checkpoint(rounds_done, federation.state, federation.snapshot(), initial, config.model_dump(mode="json"),
                       earlier_s + time.perf_counter() - started, privacy.record(), _kept(runner, method)),
        )

    records = run_dir.records(first_round)
    stopped = _run_rounds(federation, config, first_round, records, run_dir, save, progress)
    final = federation.evaluation_state() or federation.state
    setup.view.set_factors(final.factors)
    setup.view.set_head(final.head)
    run_dir.export_adapter(setup.view, final.residual)
    wall_s = earlier_s + time.perf_counter() - started
    dev_model = method.dev_model + (
        f", averaged over rounds (federation.ema_decay = {config.federation.ema_decay})" if federation.average else ""
    )
    summary = run_dir.summarise(config, records, initial, privacy.segments, wall_s, stopped, dev_model)
    run_dir.plot(records, config)
    return RunResult(run_dir.path, summary, records)


def _checked_resume(
    config: ExperimentConfig, resume: Path | None, extend_to: int | None
) -> tuple[ExperimentConfig, Checkpoint | None]:
    """The config to run and the checkpoint to continue from, checked against each other."""
    if resume is None:
        if extend_to is not None:
            raise ConfigError("extend_to continues a run: give the run directory to resume")
        return config, None
    checkpoint = load_checkpoint(resume)
    check_resumable(RunDirectory(resume), checkpoint, config, extending=extend_to is not None)
    return (extended(config, checkpoint, extend_to) if extend_to is not None else config), checkpoint


class Evaluator:
    """The run's evaluations of a global state: dev (and extra) splits, and the probe loss of the
    selection diagnostics (a personalised method's clients score their own models themselves)."""

    def __init__(self, setup: Setup) -> None:
        self.setup, task = setup, setup.task
        self.eval_sets = {"": task.encode(task.eval)}
        self.eval_sets.update({f"{name}_": task.encode(split) for name, split in task.extra_evals.items()})
        self.probe_data = task.encode_train(setup.probe) if setup.probe is not None else None

    def _load(self, state: GlobalState) -> torch.nn.Module:
        view = self.setup.view
        view.set_factors(state.factors)
        view.set_head(state.head)
        view.set_residual(state.residual)
        return view.model

    def _metrics(self, state: GlobalState, data: TensorDataset) -> dict[str, float]:
        return self.setup.task.evaluate(self._load(state), data, self.setup.config.optim.eval_batch_size)

    def probe_loss(self, state: GlobalState) -> float:
        """The mean training loss of `state` on the probe set (selection diagnostics)."""
        return mean_loss(self.setup.task.loss, self._load(state), self.probe_data, self.setup.config.optim.eval_batch_size)

    def evaluate(self, state: GlobalState) -> dict[str, float]:
        """The model on the dev split (and the task's extra evaluation splits)."""
        return {
            prefix + name: value
            for prefix, data in self.eval_sets.items()
            for name, value in self._metrics(state, data).items()
        }


def _kept(runner: Engine, method: Method) -> dict[int, dict[str, torch.Tensor]]:
    """What a checkpoint keeps of the clients' own tensors: a simulation's stand-in for their disks
    (a personalised method's; over Flower they stay on the SuperNodes, out of the server's sight)."""
    return (runner.kept_by_clients() or {}) if method.personalised else {}


def _federation(setup: Setup, method: Method, runner: Engine, evaluator: Evaluator) -> Federation:
    """The server of this run, at the initial global state, over `runner`."""
    config, fed = setup.config, setup.config.federation
    if fed.secure_aggregation and not runner.secure_aggregation:
        raise ConfigError(
            "federation.secure_aggregation runs Flower's SecAgg+ between client processes: use "
            "`aslora run --engine flower` or `flwr run .`, or set secure_aggregation = false"
        )
    return Federation(
        method=method,
        engine=runner,
        state=setup.initial,
        client_sizes=setup.sizes,
        settings=ServerSettings(
            rounds=fed.rounds,
            clients_per_round=fed.clients_per_round,
            eval_every=fed.eval_every,
            seed=config.seed,
            local=setup.local,
            delta=config.privacy.delta,
            epsilon_budget=setup.privacy.budget,
            dropout=fed.dropout,
            stragglers=fed.stragglers,
            min_clients=fed.min_clients,
            secure_aggregation=fed.secure_aggregation,
            lr_schedule=config.optim.lr_schedule,
            lr_final_scale=config.optim.lr_final_scale,
        ),
        evaluate=evaluator.evaluate,
        train_head=config.lora.train_head,
        probe=evaluator.probe_loss if evaluator.probe_data is not None else None,
        optimizer=None if fed.server_optimizer == "none" else ServerOptimizer(
            fed.server_optimizer, setup.initial, fed.server_lr, fed.server_momentum, fed.server_beta2, fed.server_eps
        ),
        average=ModelAverage(fed.ema_decay) if fed.ema_decay > 0 else None,
    )


def _run_directory(setup: Setup, resume: Path | None, extend_to: int | None) -> RunDirectory:
    """A new run directory, or the resumed one cleared of a killed save's debris; the resolved config
    and privacy plan are written where they are new (a new run, an extension)."""
    if resume is not None:
        run_dir = RunDirectory(resume)
        remove_debris(run_dir.path)
    else:
        run_dir = RunDirectory.create(setup.config)
    if resume is None or extend_to is not None:
        run_dir.write_config(setup.config, setup.privacy.__dict__ | {"client_sizes": setup.sizes})
    return run_dir


def _run_rounds(
    federation: Federation,
    config: ExperimentConfig,
    first_round: int,
    records: list[RoundRecord],
    run_dir: RunDirectory,
    save: Callable[[int], None],
    progress: Progress | None,
) -> str | None:
    """Rounds `first_round`.. of the run, each recorded and checkpointed; why it stopped early, if it did."""
    fed = config.federation
    label = f"{config.method} seed {config.seed}"
    rounds_task = progress.add_task(f"{label}: rounds", total=fed.rounds, completed=first_round) if progress else None
    clients_task = progress.add_task(f"{label}: clients", total=fed.clients_per_round) if progress else None

    def client_done(_: int) -> None:
        if progress is not None:
            progress.advance(clients_task)

    stopped = None
    for r in range(first_round, fed.rounds):
        if progress is not None:
            progress.reset(clients_task)
        round_started = time.perf_counter()
        record = federation.run_round(r, client_done)
        if r == first_round:
            warn_if_long(time.perf_counter() - round_started, fed.rounds - first_round)
        if record is None:
            stopped = "every client has spent its privacy budget"
            break
        records.append(record)
        run_dir.append_record(record)
        save(r + 1)
        if progress is not None:
            progress.advance(rounds_task)
    if progress is not None:
        progress.remove_task(rounds_task)
        progress.remove_task(clients_task)
    return stopped
