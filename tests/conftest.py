"""Shared fixtures: the local data copy and a small, fast SST-2 experiment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from aslora.config import ExperimentConfig, load_config
from aslora.engines.local import LocalEngine

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, and for the
    # processes they start (CLI runs, Flower's SuperNodes), or both oversubscribe.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local data root (ASLORA_DATA_DIR, else ../shared/data); the tests need real data."""
    root = Path(os.environ.get("ASLORA_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (root / "glue" / "SST-2" / "train.tsv").is_file():
        pytest.fail(f"SST-2 not found under {root}; set ASLORA_DATA_DIR to the data folder")
    return root


@pytest.fixture
def tiny_config(data_dir: Path, tmp_path: Path) -> ExperimentConfig:
    """The demo experiment shrunk to seconds: 4 clients, 2 local steps (the fewest AS-LoRA's secant
    score can use), short texts, a data subset, and adapters on the upper 3 blocks only, as in
    configs/paper/ (backpropagation stops there): the suite's tiny runs are mostly the encoder's
    arithmetic."""
    return load_config(REPO / "tests" / "base.toml").with_overrides(
        {
            "output_dir": str(tmp_path / "runs"),
            "data.dir": str(data_dir),
            "data.num_clients": 4,
            "data.train_subset": 400,
            "data.eval_subset": 64,
            "model.max_length": 24,
            "lora.layers": [3, 4, 5],
            "federation.rounds": 2,
            "federation.clients_per_round": 2,
            "federation.local_steps": 2,
            "federation.eval_every": 1,
            "optim.batch_size": 16,
        }
    )


def as_toml(config: ExperimentConfig) -> str:
    """The config as TOML (scalars and lists of strings are all it holds)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines, sections = [], []
    for key, v in config.model_dump(mode="json").items():
        if isinstance(v, dict):
            body = [f"{k} = {value(x)}" for k, x in v.items() if x is not None]
            sections.append(f"[{key}]\n" + "\n".join(body))
        elif v is not None:
            lines.append(f"{key} = {value(v)}")
    return "\n".join(lines) + "\n\n" + "\n\n".join(sections) + "\n"


def metric_rows(run: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class StopsInRound2(LocalEngine):
    """An in-process engine interrupted (as by Ctrl-C) when round 2 starts: what a resume test resumes."""

    def train(self, jobs, done):  # type: ignore[no-untyped-def]
        if jobs[0].round_index == 2:
            raise KeyboardInterrupt
        return super().train(jobs, done)
