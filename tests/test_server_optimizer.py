"""federation.server_optimizer: the server steps from start along start - aggregate by torch.optim
(FedAvgM, FedAdam), only on what the round trained; federation.ema_decay: the dev split scores the
average of the rounds' models, layer products averaged exactly; both survive a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import StopsInRound2, metric_rows
from safetensors.torch import load_file

from aslora.config import ConfigError, ExperimentConfig
from aslora.experiment import run_experiment
from aslora.model_average import ModelAverage, dense_updates
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


def test_the_average_over_rounds_is_the_mean_of_each_layers_product_not_the_product_of_means() -> None:
    # An alternating method's three rounds: B moves, then A, then B again.
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g)
    a1, b1 = a0 + torch.randn(2, 3, generator=g), b0 + torch.randn(3, 2, generator=g)
    states = [
        GlobalState(factors={"l0": {"A": a, "B": b}}, head={"w": torch.full((2,), h)}, scaling={"l0": 2.0})
        for a, b, h in ((a0, b1, 1.0), (a1, b1, 2.0), (a1, b0, 4.0))
    ]
    average = ModelAverage(decay=0.5)
    average.update(states[0])
    alone = average.view(states[0])  # one model averaged is itself
    assert torch.allclose(dense_updates(alone)["l0"] + alone.residual["l0"], 2.0 * b1 @ a0, atol=1e-6)
    for state in states[1:]:
        average.update(state)
    view = average.view(states[-1])
    weights = torch.tensor([0.125, 0.25, 0.5]) / 0.875  # (1 - d) d^(T - t), over their sum
    products = [2.0 * s.factors["l0"]["B"] @ s.factors["l0"]["A"] for s in states]
    expected = sum(w * p for w, p in zip(weights, products, strict=True))
    applied = 2.0 * view.factors["l0"]["B"] @ view.factors["l0"]["A"] + view.residual["l0"]  # W - W0 as the model runs
    assert torch.allclose(applied, expected, atol=1e-5)
    assert view.head["w"] == pytest.approx(torch.full((2,), float(weights @ torch.tensor([1.0, 2.0, 4.0]))))
    product_of_means = 2.0 * sum(w * s.factors["l0"]["B"] for w, s in zip(weights, states, strict=True)) @ sum(
        w * s.factors["l0"]["A"] for w, s in zip(weights, states, strict=True)
    )
    assert not torch.allclose(applied, product_of_means, atol=1e-2)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors")) | load_file(str(run / "residual.safetensors"))


def test_a_run_with_fedadam_and_averaging_resumes_to_the_uninterrupted_result(
    tiny_config: ExperimentConfig, tmp_path: Path
) -> None:
    config = tiny_config.with_overrides(
        {"method": "ffa", "federation.rounds": 4, "federation.local_steps": 1, "federation.server_optimizer": "adam",
         "federation.server_lr": 0.01, "federation.ema_decay": 0.5, "output_dir": str(tmp_path / "reference")}
    )
    reference = run_experiment(config)
    assert "averaged over rounds" in reference.summary["dev_model"]

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
        ({"federation.ema_decay": 0.9, "method": "fedsa", "data.holdout_fraction": 0.1}, "clients' own models: set ema_decay = 0"),
        ({"federation.ema_decay": 1.0}, "federation.ema_decay"),
    ],
)
def test_a_server_optimiser_that_cannot_act_fails_at_config_time(
    tiny_config: ExperimentConfig, overrides: dict[str, object], names: str
) -> None:
    with pytest.raises(ConfigError, match=names):
        tiny_config.with_overrides(overrides)
