"""benchmarks/factor_norms.py: its closed form for the DP noise's random walk, checked on a real run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import factor_norms

from aslora.config import ExperimentConfig
from aslora.experiment import run_experiment
from aslora.methods import ABLATIONS


@pytest.mark.parametrize(
    ("variant", "scaling"),
    # weights n_i / N with b_i = b, and 1 / K with b_i = q n_i: the two where a wrong weighting shows
    [("ffa", "fixed"), ("aslora official", "by_size")],
)
def test_a_factor_trained_on_noise_alone_ends_at_the_predicted_norm(
    tiny_config: ExperimentConfig, variant: str, scaling: str
) -> None:
    """Under a sigma that drowns the signal, every factor ends at its start plus the walk, on
    Dirichlet shards of unequal sizes: the derivation's weights and per-client batches are the code's."""
    config = tiny_config.with_overrides({
        **ABLATIONS.get(variant, {"method": variant}), "privacy.epsilon": None, "privacy.noise_multiplier": 50.0,
        "optim.batch_scaling": scaling, "federation.local_steps": 1, "federation.rounds": 4,
        "federation.clients_per_round": 4, "federation.eval_every": 4, "optim.lr": 0.05,
    })
    norms = factor_norms.factor_norms(run_experiment(config).directory)
    assert len(norms) == 12 and sum(n.rounds for n in norms) == 6 * 4  # one factor per layer and round
    assert all(0.93 < n.ratio < 1.07 for n in norms), norms  # 3,072 entries each: the norm is sharp
    assert any(n.factor == "B" and n.rounds > 0 for n in norms) and (variant == "ffa") != any(
        n.factor == "A" and n.rounds > 0 for n in norms
    )


def test_a_run_the_closed_form_does_not_describe_is_refused(tiny_config: ExperimentConfig) -> None:
    with pytest.raises(SystemExit, match="not every client takes part.*local_steps is not 1"):
        factor_norms.readable(tiny_config, Path("run"))
