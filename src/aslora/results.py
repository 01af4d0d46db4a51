"""A run's directory: resolved config, metrics.jsonl, summary.json, adapter, plots."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from aslora import diagnostics
from aslora.adapters import LoraView
from aslora.config import ExperimentConfig
from aslora.methods import method_class
from aslora.report import plot_calibration, plot_mask, plot_run
from aslora.server import RoundRecord


def to_json(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


class RunDirectory:
    """Everything one run writes, under runs/<timestamp>-<name>-<method>-s<seed>/."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, config: ExperimentConfig) -> RunDirectory:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(config.output_dir) / f"{stamp}-{config.name}-{config.method}-s{config.seed}"
        path, n = base, 1
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
        path.mkdir(parents=True)
        return cls(path)

    def write_config(self, config: ExperimentConfig, resolved_privacy: dict[str, Any]) -> None:
        body = {"config": config.model_dump(mode="json"), "privacy_plan": resolved_privacy}
        (self.path / "config.json").write_text(json.dumps(to_json(body), indent=2))

    def records(self, rounds: int) -> list[RoundRecord]:
        """The first `rounds` records of metrics.jsonl, which is cut back to them (resume)."""
        path = self.path / "metrics.jsonl"
        lines = path.read_text().splitlines()[:rounds] if path.is_file() else []
        path.write_text("".join(line + "\n" for line in lines))
        return [RoundRecord(**json.loads(line)) for line in lines]

    def append_record(self, record: RoundRecord) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(to_json(record.as_json())) + "\n")

    def export_adapter(self, view: LoraView, residual: dict[str, torch.Tensor]) -> Path:
        """The PEFT adapter; for methods that fold updates into W0, and for a model averaged over
        rounds (federation.ema_decay), also residual.safetensors.

        The final model of such a method is W0 + residual + adapter: add each
        layer's residual to its base weight before loading the adapter.
        """
        path = view.export(self.path / "adapter")
        if residual:
            save_file({k: v.contiguous() for k, v in residual.items()}, str(self.path / "residual.safetensors"))
        return path

    def summarise(
        self,
        config: ExperimentConfig,
        records: list[RoundRecord],
        initial: dict[str, float],
        segments: Sequence[tuple[int, float]],
        wall_time_s: float,
        stopped: str | None,
        dev_model: str = "the server's global model",
    ) -> dict[str, Any]:
        evaluated = [r for r in records if r.metrics]
        final = evaluated[-1].metrics if evaluated else {}
        summary = {
            "name": config.name,
            "method": config.method,
            "seed": config.seed,
            "rounds_completed": len(records),
            "rounds_planned": config.federation.rounds,
            "stopped_early": stopped,
            "initial_metrics": initial,
            "final_metrics": final,
            "dev_model": dev_model,  # what the dev metrics score (Method.dev_model)
            "metric_by_round": {r.round: r.metrics for r in evaluated},
            "epsilon": records[-1].epsilon if records else 0.0,
            "delta": config.privacy.delta,
            "noise_multiplier": segments[-1][1],
            # several where the run was extended (`--resume --rounds`): the sigma of each part
            "noise_multiplier_by_segment": [{"first_round": r, "noise_multiplier": s} for r, s in segments],
            "mean_agg_error": _mean([r.agg_error for r in records if r.agg_error is not None], None),
            "total_agg_time_s": sum(r.agg_time_s for r in records),
            "total_server_time_s": sum(r.server_time_s for r in records),
            "total_client_time_s": sum(r.client_time_s for r in records),
            "mean_bytes_up_per_client": _mean([r.bytes_up_per_client for r in records]),
            "mean_bytes_down_per_client": _mean([r.bytes_down_per_client for r in records]),
            "rejected_updates": sum(len(r.rejected) for r in records),
            "selection_diagnostics": diagnostics.summarise(records),
            "wall_time_s": wall_time_s,
        }
        (self.path / "summary.json").write_text(json.dumps(to_json(summary), indent=2))
        return summary

    def plot(self, records: list[RoundRecord], config: ExperimentConfig) -> list[Path]:
        """metrics.png, then the figures the method declares (Method.plots) that its records can fill."""
        title = f"{config.name}: {config.method}"
        paths = [plot_run(records, self.path / "metrics.png", title=title)]
        for name in method_class(config.method).plots:
            plot, has_data = PLOTS[name]
            if any(has_data(r) for r in records):
                paths.append(plot(records, self.path / f"{name}.png", title))
        return paths


# A method's figures by name (Method.plots): the plot, and whether a round has data for it.
PLOTS: dict[str, tuple[Callable[[Sequence[RoundRecord], Path, str], Path], Callable[[RoundRecord], bool]]] = {
    "mask": (plot_mask, lambda record: bool(record.mask)),
    "calibration": (plot_calibration, lambda record: bool(record.diagnostics)),
}


def _mean(values: list[float], empty: float | None = 0.0) -> float | None:
    return sum(values) / len(values) if values else empty
