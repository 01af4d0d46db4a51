"""benchmarks/factor_norms.py: its closed form for the DP noise's random walk, checked on a real run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import factor_norms

from aslora.config import ExperimentConfig
from aslora.experiment import run_experiment


def test_a_factor_trained_on_noise_alone_ends_at_the_predicted_norm(tiny_config: ExperimentConfig) -> None:
    """FFA-LoRA under a sigma that drowns the signal: B's final norm is the walk's, whatever the
    shard sizes (Dirichlet), so the derivation's weights and per-client batches are the code's."""
    config = tiny_config.with_overrides({
        "method": "ffa", "privacy.epsilon": None, "privacy.noise_multiplier": 50.0, "optim.batch_scaling": "by_size",
        "federation.local_steps": 1, "federation.rounds": 3, "federation.clients_per_round": 4,
        "federation.eval_every": 3, "optim.lr": 0.05,
    })
    norms = factor_norms.factor_norms(run_experiment(config).directory)
    b = [n for n in norms if n.factor == "B"]
    assert len(b) == 6 and all(n.rounds == 3 for n in b)
    assert all(0.93 < n.ratio < 1.07 for n in b), b  # 3,072 entries each: the norm is sharp
    a = [n for n in norms if n.factor == "A"]
    assert all(n.rounds == 0 and 0.9 < n.ratio < 1.1 for n in a), a  # FFA keeps A at its start


def test_a_run_the_closed_form_does_not_describe_is_refused(tiny_config: ExperimentConfig) -> None:
    with pytest.raises(SystemExit, match="local_steps is not 1.*by_size"):
        factor_norms.readable(tiny_config, Path("run"))
