"""federation.server_optimizer: the server steps from start along start - aggregate by torch.optim
(FedAvgM, FedAdam), only on what the round trained, and its moments survive a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import StopsInRound2, metric_rows
from safetensors.torch import load_file

from aslora.config import ConfigError, ExperimentConfig
from aslora.experiment import run_experiment
from aslora.protocol import GlobalState
from aslora.server_optimizer import ServerOptimizer


def _state(a: float, b: float, head: float) -> GlobalState:
    return GlobalState(
        factors={"l0": {"A": torch.full((2, 3), a), "B": torch.full((3, 2), b)}},
        head={"weight": torch.full((2, 2), head)},
        scaling={"l0": 1.0},
    )


def test_adam_steps_only_what_the_round_trained_by_lr_on_its_first_step() -> None:
    start = _state(a=1.0, b=0.5, head=0.0)
    optimizer = ServerOptimizer("adam", start, lr=0.01, momentum=0.9, beta2=0.99, eps=1e-8)
    # The round trained B and the head (A frozen, as in FFA-LoRA or one AS-LoRA round).
    new = optimizer.step(start, _state(a=1.0, b=0.3, head=0.2))
    assert torch.equal(new.factors["l0"]["A"], start.factors["l0"]["A"])
    # A bias-corrected first Adam step moves each coordinate by lr against its gradient's sign.
    assert new.factors["l0"]["B"] == pytest.approx(torch.full((3, 2), 0.5 - 0.01))
    assert new.head["weight"] == pytest.approx(torch.full((2, 2), 0.01))
    assert new.scaling == start.scaling


def test_momentum_carries_each_rounds_step_into_the_next_and_momentum_0_is_fedavg() -> None:
    start = _state(a=1.0, b=0.0, head=0.0)
    plain = ServerOptimizer("momentum", start, lr=1.0, momentum=0.0, beta2=0.99, eps=1e-3)
    aggregate = _state(a=1.0, b=0.2, head=-0.1)
    assert plain.step(start, aggregate).tensors().keys() == aggregate.tensors().keys()
    assert all(torch.equal(t, aggregate.tensors()[k]) for k, t in plain.step(start, aggregate).tensors().items())

    heavy = ServerOptimizer("momentum", start, lr=0.5, momentum=0.9, beta2=0.99, eps=1e-3)
    first = heavy.step(start, _state(a=1.0, b=0.2, head=0.0))  # g1 = -0.2 on B: B = 0.1
    second = heavy.step(first, _state(a=1.0, b=0.2, head=0.0))  # g2 = 0.1 - 0.2: buffer 0.9 g1 + g2 = -0.28
    assert first.factors["l0"]["B"] == pytest.approx(torch.full((3, 2), 0.1))
    assert second.factors["l0"]["B"] == pytest.approx(torch.full((3, 2), 0.1 + 0.5 * 0.28))


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_a_run_with_fedadam_resumes_to_the_uninterrupted_result(tiny_config: ExperimentConfig, tmp_path: Path) -> None:
    config = tiny_config.with_overrides(
        {"method": "ffa", "federation.rounds": 4, "federation.local_steps": 1, "federation.server_optimizer": "adam",
         "federation.server_lr": 0.01, "output_dir": str(tmp_path / "reference")}
    )
    reference = run_experiment(config)

    stopped = config.with_overrides({"output_dir": str(tmp_path / "stopped")})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(stopped, engine=lambda setup: setup.local_engine(StopsInRound2))
    (run,) = (tmp_path / "stopped").iterdir()
    run_experiment(stopped, resume=run)
    final, expected = _adapter(run), _adapter(reference.directory)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert [r["round"] for r in metric_rows(run)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"federation.server_lr": 0.1}, "server_optimizer = 'none' uses none"),
        ({"federation.server_optimizer": "momentum", "federation.server_eps": 1e-4}, "server_eps is Adam's"),
        ({"federation.server_optimizer": "adam", "method": "fedsvd"}, "method .fedsvd. does not: use aslora, fedavg"),
        ({"federation.server_optimizer": "nesterov"}, "'adam'"),
    ],
)
def test_a_server_optimiser_that_cannot_act_fails_at_config_time(
    tiny_config: ExperimentConfig, overrides: dict[str, object], names: str
) -> None:
    with pytest.raises(ConfigError, match=names):
        tiny_config.with_overrides(overrides)
