"""Command line: run, compare, privacy."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aslora.config import ConfigError, ExperimentConfig, load_config, parse_config
from aslora.privacy import calibrate_noise, epsilon_for
from aslora.report import comparison_table, plot_comparison
from aslora.tasks import DataNotFoundError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Piped into a file or a CI log there is no terminal width: keep tables whole.
console = Console(width=None if sys.stdout.isatty() else 160)

ConfigArg = Annotated[Path, typer.Argument(help="experiment TOML file, e.g. configs/demo.toml")]
MethodOpt = Annotated[str | None, typer.Option(help="federated method, e.g. fedavg or ffa")]
EpsilonOpt = Annotated[float | None, typer.Option(help="target epsilon per client (also the budget)")]
RoundsOpt = Annotated[int | None, typer.Option(help="communication rounds")]
DataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="folder holding glue/<TASK>/ (else ASLORA_DATA_DIR, else the hub)")]
OutputOpt = Annotated[str | None, typer.Option("--output-dir", help="where run directories go (default runs/)")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    # Harmless and repeated every client round: Opacus's full backward hooks on
    # modules whose inputs need no gradient, and a transformers deprecation
    # that PEFT triggers.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


def _configure(path: Path, overrides: dict[str, Any]) -> ExperimentConfig:
    """The file's config for the chosen method (its per_method table applied), then the flags."""
    config = load_config(path)
    return config.for_method(overrides.get("method") or config.method, overrides)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML file, e.g. configs/demo.toml")] = None,
    method: MethodOpt = None,
    epsilon: EpsilonOpt = None,
    rounds: Annotated[
        int | None, typer.Option(help="communication rounds; with --resume, extend the run to N rounds")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="run seed")] = None,
    data_dir: DataDirOpt = None,
    output_dir: OutputOpt = None,
    engine: Annotated[str, typer.Option(help="local (in-process) or flower (Flower's simulation engine)")] = "local",
    resume: Annotated[Path | None, typer.Option(help="a run directory to continue from its last checkpoint")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run one federated experiment and write runs/<id>/."""
    _setup_logging(verbose)
    from aslora.experiment import run_experiment

    try:
        if resume is not None:
            given = {"CONFIG": config, "--method": method, "--epsilon": epsilon, "--seed": seed,
                     "--data-dir": data_dir, "--output-dir": output_dir}
            ignored = [name for name, value in given.items() if value is not None]
            if ignored:
                raise ValueError(
                    f"--resume continues a run with the settings it started with; drop {', '.join(ignored)} "
                    "(only --rounds N may go with it, to extend the run within its privacy budget; any "
                    "other change is a new run)"
                )
            cfg = _resumed_config(resume)
        elif config is None:
            raise ValueError("give a CONFIG file, or --resume runs/<id> to continue a run")
        else:
            cfg = _configure(
                config,
                {"method": method, "privacy.epsilon": epsilon, "federation.rounds": rounds, "seed": seed,
                 "data.dir": data_dir, "output_dir": output_dir},
            )
        if engine == "flower":
            if resume is not None:
                raise ValueError("--resume continues on the local engine; drop --engine flower")
            summary, directory = _run_on_flower(cfg)
        elif engine == "local":
            with _progress() as progress:
                result = run_experiment(cfg, progress, resume=resume, extend_to=rounds if resume else None)
            summary, directory = result.summary, result.directory
        else:
            raise ValueError(f"--engine {engine!r}: choose local or flower")
    except (ConfigError, DataNotFoundError, ValueError, OSError, RuntimeError) as exc:
        _fail(exc)
    console.print(comparison_table([summary], _metric(summary)))
    segments = summary.get("noise_multiplier_by_segment", [])
    if len(segments) > 1:
        parts = ", ".join(f"sigma {s['noise_multiplier']:.4g} from round {s['first_round'] + 1}" for s in segments)
        budget = cfg.privacy.epsilon
        console.print(f"extended run: {parts}" + (f", within the budget epsilon = {budget}" if budget else ""))
    console.print(f"results in [bold]{directory}[/]")


def _resumed_config(run_dir: Path) -> ExperimentConfig:
    """The resolved config a run directory was started with."""
    stored = run_dir / "config.json"
    if not stored.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json); pass runs/<id>")
    return parse_config(json.loads(stored.read_text())["config"])


def _run_on_flower(config: ExperimentConfig) -> tuple[dict[str, Any], Path]:
    """The experiment on Flower's simulation engine, one SuperNode per client."""
    import os
    import tempfile

    from flwr.simulation import run_simulation

    from aslora.engines.flower import CONFIG_ENV, client_app, server_app

    before = set(Path(config.output_dir).glob("*/summary.json"))
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.json"
        resolved.write_text(config.model_dump_json())
        os.environ[CONFIG_ENV] = str(resolved)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        run_simulation(
            server_app,
            client_app,
            num_supernodes=config.data.num_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    written = sorted(set(Path(config.output_dir).glob("*/summary.json")) - before)
    if not written:
        raise RuntimeError("the Flower run wrote no results; rerun with --verbose to see its log")
    return json.loads(written[-1].read_text()), written[-1].parent


@app.command()
def compare(
    config: ConfigArg,
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = "fedavg,ffa",
    seeds: Annotated[int, typer.Option(help="number of seeds, counted up from the config's seed")] = 1,
    target: Annotated[float | None, typer.Option(help="report rounds until the metric reaches this value")] = None,
    epsilon: EpsilonOpt = None,
    rounds: RoundsOpt = None,
    data_dir: DataDirOpt = None,
    output_dir: OutputOpt = None,
    workers: Annotated[int, typer.Option(
        help="runs at a time, each in its own process with cpu_count/workers torch threads"
    )] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run several methods and seeds on the same partitions; print one table."""
    _setup_logging(verbose)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        flags = {"privacy.epsilon": epsilon, "federation.rounds": rounds, "data.dir": data_dir, "output_dir": output_dir}
        base = load_config(config)
        configs = [
            base.for_method(name, {**flags, "seed": base.seed + s}) for name in names for s in range(seeds)
        ]
        if not names:
            raise ValueError(f"--methods {methods!r} names no method; e.g. --methods fedavg,ffa,aslora")
        if seeds < 1 or workers < 1:
            raise ValueError(f"--seeds {seeds} --workers {workers}: both must be at least 1")
        summaries = _run_all(configs, workers, verbose)
        curves: dict[str, list] = {}
        for cfg, summary in zip(configs, summaries, strict=True):
            curves.setdefault(cfg.method, []).append(summary["metric_by_round"])
    except (ConfigError, DataNotFoundError, ValueError, OSError) as exc:
        _fail(exc)
    metric = _metric(summaries[0])
    out = Path(configs[0].output_dir) / f"compare-{datetime.now():%Y%m%d-%H%M%S}-{base.name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summaries.json").write_text(json.dumps(summaries, indent=2, default=str))
    plot_comparison(curves, metric, out / "comparison.png")
    console.print(comparison_table(summaries, metric, target))
    console.print(f"comparison in [bold]{out}[/]")


def _run_all(configs: list[ExperimentConfig], workers: int, verbose: bool) -> list[dict[str, Any]]:
    """Every config's summary, in order. With several workers each run has its own process and
    an equal share of the cores: on 2 cores two single-threaded runs side by side finish sooner
    than the same two runs one after the other on 2 threads (README, "The demo")."""
    from aslora.experiment import run_experiment

    if workers == 1:
        with _progress() as progress:
            return [run_experiment(cfg, progress).summary for cfg in configs]
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with (
        ProcessPoolExecutor(workers, context, initializer=_worker_init, initargs=(threads, verbose)) as pool,
        _progress() as progress,
    ):
        task = progress.add_task(f"{len(configs)} runs, {workers} at a time", total=len(configs))
        futures = [pool.submit(_summary_of, cfg) for cfg in configs]
        for _ in as_completed(futures):
            progress.advance(task)
        return [f.result() for f in futures]


def _worker_init(threads: int, verbose: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    _setup_logging(verbose)


def _summary_of(config: ExperimentConfig) -> dict[str, Any]:
    from aslora.experiment import run_experiment

    return run_experiment(config).summary


@app.command()
def privacy(
    delta: Annotated[float, typer.Option(help="target delta")] = 1e-5,
    sample_rate: Annotated[float, typer.Option(help="Poisson sampling rate q = b / n")] = 0.01,
    steps: Annotated[int, typer.Option(help="DP-SGD steps")] = 500,
    epsilon: Annotated[float | None, typer.Option(help="target epsilon: prints the noise multiplier")] = None,
    sigma: Annotated[float | None, typer.Option(help="noise multiplier: prints the epsilon it spends")] = None,
    accountant: Annotated[str, typer.Option(help="rdp or prv")] = "rdp",
) -> None:
    """Sigma for a target epsilon, or the epsilon of a given sigma."""
    if (epsilon is None) == (sigma is None):
        _fail(ValueError("give exactly one of --epsilon (to get sigma) or --sigma (to get epsilon)"))
    if accountant not in ("rdp", "prv"):
        _fail(ValueError(f"--accountant {accountant!r}: choose rdp or prv"))
    where = f"q={sample_rate}, steps={steps}, delta={delta}, {accountant} accountant"
    try:
        if epsilon is not None:
            value = calibrate_noise(epsilon, delta, sample_rate, steps, accountant)
            console.print(f"noise multiplier sigma = {value:.6g} for epsilon = {epsilon} ({where})")
        else:
            value = epsilon_for(sigma, delta, sample_rate, steps, accountant)
            console.print(f"epsilon = {value:.6g} for noise multiplier sigma = {sigma} ({where})")
    except ValueError as exc:  # names the quantity (--epsilon, --sigma, --delta, --sample-rate, --steps)
        _fail(exc)


def _metric(summary: dict[str, Any]) -> str:
    names = [k for k in summary["final_metrics"] if not k.endswith("loss")]
    return names[0] if names else "accuracy"
