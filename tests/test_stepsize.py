"""optim.step_control: a local step after an overshoot is shortened to where the loss along it is lowest, and
'secant_decay' starts each round where the last steps ended; optim.lr_schedule: the server's lr over rounds."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from conftest import StopsInRound2, metric_rows

from aslora.config import ConfigError, ExperimentConfig
from aslora.experiment import run_experiment
from aslora.stepsize import SecantStepControl, next_round_multiplier, scheduled_multiplier


def _steps(
    curvatures: list[float], lr: float, steps: int, noise: float = 0.0, seed: int = 0, start: float = 1.0
) -> tuple[torch.Tensor, list[float]]:
    """SGD with the control on f(w) = sum h_i w_i^2 / 2 from w = start, each gradient with N(0, noise^2) added."""
    h = torch.tensor(curvatures, dtype=torch.float64)
    w = torch.nn.Parameter(torch.full((len(curvatures),), start, dtype=torch.float64))
    optimizer = torch.optim.SGD([w], lr=lr)
    control = SecantStepControl(optimizer, noise**2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        w.grad = h * w.detach() + noise * torch.randn(len(curvatures), generator=generator, dtype=torch.float64)
        control()
        optimizer.step()
    return w.detach(), control.multipliers


def test_an_overshooting_step_is_followed_by_one_to_the_minimum() -> None:
    # lr h = 3: the first step jumps from 1 to -2; the second, at lr / 3, lands on 0.
    w, multipliers = _steps([3.0], lr=1.0, steps=2)
    assert multipliers == pytest.approx([1.0, 1 / 3])
    assert float(w.abs().max()) < 1e-12


def test_a_stable_step_keeps_its_lr() -> None:
    # lr h = 0.5: no overshoot; the quadratic's minimum lies beyond the step, and the lr is a cap.
    w, multipliers = _steps([0.5, 0.25], lr=1.0, steps=3)
    assert multipliers == [1.0, 1.0, 1.0]
    assert w.tolist() == pytest.approx([0.5**3, 0.75**3])


def test_the_noise_of_the_first_gradient_is_no_slope() -> None:
    # h = 3 everywhere, and the gradient's noise as large as its signal (||s||^2 = nu dim = 4): along
    # the noisy step the loss is lowest at a* = ||s||^2 / (3 ||s + z||^2) = 1/6. Taking ||g1||^2 for
    # the slope, noise included, would give 8 / 28 = 0.29.
    multipliers = [
        _steps([3.0] * 400, lr=1.0, steps=2, noise=0.1, seed=s, start=0.1 / 3)[1][1] for s in range(10)
    ]
    assert sum(multipliers) / 10 == pytest.approx(1 / 6, abs=0.02)


def test_a_dp_run_logs_its_multipliers_and_shortens_no_step_beyond_lr(tiny_config: ExperimentConfig) -> None:
    config = tiny_config.with_overrides({"method": "ffa", "optim.step_control": "secant", "optim.lr": 8.0})
    rows = run_experiment(config).records
    for row in rows:
        first, second = row.lr_multiplier_by_step
        assert first == 1.0 and 0.0 <= second <= 1.0
    assert all(len(r.train_loss_by_step) == 2 for r in rows)


def test_no_client_report_can_raise_the_next_rounds_lr() -> None:
    assert next_round_multiplier(0.5, [0.25, 0.75]) == pytest.approx(0.375)  # 0.75 held to 0.5
    assert next_round_multiplier(0.5, [float("nan"), float("inf"), 1e9]) == 0.5
    assert next_round_multiplier(0.5, [-3.0, 0.5]) == 0.25
    assert next_round_multiplier(0.5, []) == 0.5


def test_the_decay_starts_each_round_where_the_last_steps_ended_and_survives_a_resume(
    tiny_config: ExperimentConfig, tmp_path: Path
) -> None:
    config = tiny_config.with_overrides(
        {"method": "ffa", "optim.step_control": "secant_decay", "optim.lr": 8.0, "federation.rounds": 4,
         "privacy.noise_multiplier": 2.0, "output_dir": str(tmp_path / "reference")}
    )
    rows = [r.lr_multiplier_by_step for r in run_experiment(config).records]
    assert rows[0][0] == 1.0
    for before, after in itertools.pairwise(rows):
        # 2 clients per round, each starting at the same lr: the mean of their last steps
        assert after[0] <= before[0] and after[0] == pytest.approx(before[-1])
    assert rows[-1][0] < 1.0

    stopped = config.with_overrides({"output_dir": str(tmp_path / "stopped")})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(stopped, engine=lambda setup: setup.local_engine(StopsInRound2))
    (run,) = (tmp_path / "stopped").iterdir()
    run_experiment(stopped, resume=run)
    resumed = [m for r in metric_rows(run) for m in r["lr_multiplier_by_step"]]
    assert resumed == pytest.approx([m for r in rows for m in r])


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"optim.step_control": "secant", "optim.optimizer": "adam"}, "optim.optimizer='sgd'"),
        ({"optim.step_control": "secant", "federation.local_steps": 1}, "local_steps"),
        ({"optim.step_control": "bb"}, "secant"),
        ({"optim.step_control": "secant_decay", "optim.lr_schedule": "cosine"}, "keep one"),
        ({"optim.lr_schedule": "linear"}, "cosine"),
        ({"optim.lr_final_scale": 1.5}, "lr_final_scale"),
    ],
)
def test_a_step_control_that_cannot_act_fails_at_config_time(
    tiny_config: ExperimentConfig, tmp_path: Path, overrides: dict[str, object], names: str
) -> None:
    with pytest.raises(ConfigError, match=names):
        tiny_config.with_overrides(overrides)


def test_the_cosine_schedule_falls_from_lr_towards_its_final_scale() -> None:
    values = [scheduled_multiplier("cosine", r, 10, 0.1) for r in range(10)]
    assert values[0] == 1.0 and values[5] == pytest.approx(0.55)  # halfway: the mean of 1 and 0.1
    assert all(a > b for a, b in itertools.pairwise(values)) and values[-1] > 0.1
    assert [scheduled_multiplier("constant", r, 10, 0.1) for r in range(10)] == [1.0] * 10


def test_the_clients_step_at_the_scheduled_lr_and_a_resume_continues_it(
    tiny_config: ExperimentConfig, tmp_path: Path
) -> None:
    # With the secant control each client reports its steps' lr: the first step's is the round's.
    config = tiny_config.with_overrides(
        {"method": "ffa", "optim.lr_schedule": "cosine", "optim.step_control": "secant", "federation.rounds": 4,
         "output_dir": str(tmp_path / "reference")}
    )
    rows = run_experiment(config).records
    expected = [scheduled_multiplier("cosine", r, 4, 0.0) for r in range(4)]
    assert [r.lr_multiplier for r in rows] == pytest.approx(expected)
    assert [r.lr_multiplier_by_step[0] for r in rows] == pytest.approx(expected)

    stopped = config.with_overrides({"output_dir": str(tmp_path / "stopped")})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(stopped, engine=lambda setup: setup.local_engine(StopsInRound2))
    (run,) = (tmp_path / "stopped").iterdir()
    run_experiment(stopped, resume=run)
    assert [r["lr_multiplier"] for r in metric_rows(run)] == pytest.approx(expected)
