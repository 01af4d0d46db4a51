"""DP-SGD on a client: exact per-sample clipping across factor switches, and the accounting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from typer.testing import CliRunner

from aslora.adapters import LoraView
from aslora.cli import app
from aslora.client import LocalSettings, _logical_step, train_client
from aslora.config import ExperimentConfig, load_config
from aslora.privacy import (
    RDP_ORDERS,
    DPSettings,
    calibrate_noise,
    epsilon_for,
    new_accountant,
    private_training,
    restore_accountant,
    spent_epsilon,
    with_head_share,
)
from aslora.protocol import ClientJob, GlobalState
from aslora.tasks import load_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task_and_view(data_dir: Path) -> tuple:
    config: ExperimentConfig = load_config(REPO / "tests" / "base.toml").with_overrides(
        {"data.dir": str(data_dir), "data.train_subset": 64, "data.eval_subset": 8, "model.max_length": 32}
    )
    task = load_task(config)
    view = LoraView(task.build_model(config))
    # Opacus captures activations only in train mode; without dropout the
    # hand computation below sees the same deterministic function.
    for module in view.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    gen = torch.Generator().manual_seed(0)
    # Non-zero B so that A receives gradient too.
    view.set_factors({layer: {"B": 0.05 * torch.randn(view.parameter(layer, "B").shape, generator=gen)} for layer in view.layers})
    return task, view


def _per_example_expected(task, view, params, batch, clip, expected_batch):
    """The DP-SGD gradient by hand: per-example gradients, joint clip over `params`, mean."""
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(len(batch[-1])):
        loss = task.loss(view.model, tuple(t[i : i + 1] for t in batch))
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        norms.append(norm)
        factor = min(1.0, clip / (norm + 1e-6))  # Opacus's clip factor
        for acc, g in zip(total, grads, strict=True):
            acc += factor * g.double()
    return [t / expected_batch for t in total], norms


def _dp_step(task, view, params, data, batch, clip, clip_groups=None):
    """One Opacus DP-SGD step with zero noise on a fixed batch; returns the gradient it applied."""
    dp = DPSettings(enabled=True, noise_multiplier=0.0, clip=clip)
    generator = torch.Generator().manual_seed(0)
    accountant = new_accountant("rdp")
    with private_training(
        view.model, params, data, 16 / len(data), "sgd", 0.0, dp, accountant, generator, clip_groups=clip_groups
    ) as s:
        s.module.train()  # Opacus records activations in train mode only
        s.optimizer.zero_grad(set_to_none=True)
        task.loss(s.module, batch).backward()
        s.optimizer.step()
        assert s.optimizer.max_grad_norm == clip  # the noise std is sigma C, whatever the groups
        return [p.grad.detach().clone() for p in params], s.optimizer.expected_batch_size


def test_group_clipping_splits_the_budget_and_keeps_the_sensitivity(task_and_view) -> None:
    """selection.score_clip_share: the A factors clipped to C sqrt(s), the rest to C sqrt(1 - s), so
    every example still moves the sum by at most C (DP-SGD's sensitivity) at the same sigma."""
    task, view = task_and_view
    data = task.encode(task.train)
    batch = data[:12]
    clip, share = 1e-3, 0.2
    params = view.set_trainable({layer: ("A", "B") for layer in view.layers}, train_head=True)
    a_factors = [view.parameter(layer, "A") for layer in view.layers]
    in_a = [any(p is q for q in a_factors) for p in params]
    rest = [p for p, a in zip(params, in_a, strict=True) if not a]
    applied, expected_batch = _dp_step(task, view, params, data, batch, clip, [(a_factors, share), (rest, 1 - share)])
    thresholds = [clip * share**0.5 if a else clip * (1 - share) ** 0.5 for a in in_a]
    want = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(len(batch[-1])):
        grads = torch.autograd.grad(task.loss(view.model, tuple(t[i : i + 1] for t in batch)), params)
        contribution = 0.0
        for group in (True, False):
            members = [k for k, a in enumerate(in_a) if a == group]
            norm = float(torch.sqrt(sum((grads[k].double() ** 2).sum() for k in members)))
            limit = thresholds[members[0]]
            assert norm > 10 * limit  # every group of every example is really clipped
            factor = min(1.0, limit / (norm + 1e-6))
            contribution += (factor * norm) ** 2
            for k in members:
                want[k] += factor * grads[k].double()
        assert contribution**0.5 <= clip * (1 + 1e-6)
    for got, expected in zip(applied, want, strict=True):
        expected = expected / expected_batch
        assert float((got.double() - expected).norm() / expected.norm()) < 1e-4


def test_clipping_is_exact_after_switching_factors(task_and_view) -> None:
    task, view = task_and_view
    data = task.encode(task.train)
    batch = data[:12]
    clip = 1e-3
    # Round 1 trains B only (and the head) ...
    first = view.set_trainable({layer: ("B",) for layer in view.layers}, train_head=True)
    _dp_step(task, view, first, data, batch, clip)
    # ... round 2 switches half the layers to A and the rest to both: re-attached, clip must be exact.
    mask = {layer: ("A",) if i % 2 else ("A", "B") for i, layer in enumerate(view.layers)}
    params = view.set_trainable(mask, train_head=True)
    assert len(params) != len(first)
    applied, expected_batch = _dp_step(task, view, params, data, batch, clip)
    expected, norms = _per_example_expected(task, view, params, batch, clip, expected_batch)
    assert min(norms) > 10 * clip  # every example is really clipped
    for got, want in zip(applied, expected, strict=True):
        # float32 forward passes of different batch shapes: compare relative norms.
        assert float((got.double() - want).norm() / want.norm()) < 1e-4
    # Nothing outside the trained set moved.
    untouched = [view.parameter(layer, "B") for layer, fs in mask.items() if "B" not in fs]
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in untouched)


def test_opacus_detaches_cleanly(task_and_view) -> None:
    task, view = task_and_view
    params = view.set_trainable({layer: ("B",) for layer in view.layers}, train_head=True)
    _dp_step(task, view, params, task.encode(task.train), task.encode(task.train)[:4], 1.0)
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in view.model.modules())
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in params)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(0.6, 0.005, 20), (1.1, 0.01, 300), (2.0, 0.2, 50)])
def test_epsilon_equals_opacus_rdp(sigma: float, q: float, steps: int) -> None:
    history = [(sigma, q, steps // 2), (sigma, q, steps - steps // 2)]
    ours = spent_epsilon(restore_accountant("rdp", history), 1e-5)
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(RDP_ORDERS))
    direct, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=1e-5)
    assert ours == pytest.approx(direct, rel=1e-9)
    opacus_default = RDPAccountant()
    opacus_default.history = history
    assert ours <= opacus_default.get_epsilon(1e-5) + 1e-9  # more orders can only tighten


def test_calibration_hits_the_target() -> None:
    for accountant in ("rdp", "prv"):
        sigma = calibrate_noise(3.0, 1e-5, 0.005, 40, accountant)
        spent = epsilon_for(sigma, 1e-5, 0.005, 40, accountant)
        assert 2.9 <= spent <= 3.0
        assert epsilon_for(sigma * 0.9, 1e-5, 0.005, 40, accountant) > 3.0


def test_cli_privacy_both_ways() -> None:
    runner = CliRunner()
    forward = runner.invoke(app, ["privacy", "--epsilon", "2", "--sample-rate", "0.01", "--steps", "200"])
    assert forward.exit_code == 0, forward.output
    sigma = float(forward.output.split("sigma = ")[1].split()[0])
    back = runner.invoke(app, ["privacy", "--sigma", str(sigma), "--sample-rate", "0.01", "--steps", "200"])
    assert back.exit_code == 0, back.output
    epsilon = float(back.output.split("epsilon = ")[1].split()[0])
    assert epsilon == pytest.approx(2.0, abs=0.05)
    both = runner.invoke(app, ["privacy", "--sigma", "1", "--epsilon", "1"])
    assert both.exit_code == 2 and "exactly one" in both.output
    assert np.isfinite(sigma)


def test_added_noise_has_the_configured_standard_deviation(task_and_view) -> None:
    """With a zero loss the applied gradient is the noise alone: N(0, (sigma C / b)^2) per coordinate."""
    task, view = task_and_view
    data = task.encode(task.train)
    params = view.set_trainable({layer: ("A", "B") for layer in view.layers}, train_head=True)
    sigma, clip = 1.3, 0.7
    dp = DPSettings(enabled=True, noise_multiplier=sigma, clip=clip)
    with private_training(view.model, params, data, 16 / len(data), "sgd", 0.0, dp, new_accountant("rdp"), torch.Generator().manual_seed(5)) as s:
        s.module.train()
        s.optimizer.zero_grad(set_to_none=True)
        (0.0 * s.module(**task._inputs(data[:8])).logits.sum()).backward()
        s.optimizer.step()
        noise = torch.cat([p.grad.flatten() for p in params])
        expected = sigma * clip / s.optimizer.expected_batch_size
    assert noise.numel() > 50_000
    assert float(noise.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(noise.mean())) < 3 * expected / noise.numel() ** 0.5


def test_dp_sgd_without_noise_or_clipping_is_plain_sgd(task_and_view) -> None:
    """sigma = 0 and an unreachable clip: Opacus's gradient equals the plain mean gradient."""
    task, view = task_and_view
    data = task.encode(task.train)
    batch = data[:16]
    params = view.set_trainable({layer: ("A", "B") for layer in view.layers}, train_head=True)
    grads = {}
    for enabled in (True, False):
        dp = DPSettings(enabled=enabled, noise_multiplier=0.0, clip=1e9)
        with private_training(view.model, params, data, 16 / len(data), "sgd", 0.0, dp, new_accountant("rdp"), torch.Generator()) as s:
            s.module.train()
            s.optimizer.zero_grad(set_to_none=True)
            task.loss(s.module, batch).backward()
            s.step()
            grads[enabled] = [p.grad.detach().clone() for p in params]
    for private, plain in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(private, plain, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_dp_round_stays_within_the_update_norm_bound(tmp_path: Path, optimizer: str) -> None:
    """Real DP-SGD rounds on the synthetic task move the trained tensors less than the bound
    derived from clip, noise, batch, learning rate and steps, and the bound is not vacuous."""
    from aslora.experiment import prepare
    from aslora.privacy import update_norm_bound
    from aslora.protocol import ClientJob

    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path), "optim.optimizer": optimizer, "optim.lr": 0.05, "federation.local_steps": 6}
    )
    setup = prepare(config)
    local, view = setup.local, setup.view
    start = setup.initial  # what every client holds before its first download
    for client, mask in ((0, {layer: ("A", "B") for layer in view.layers}), (1, {view.layers[0]: ("B",)})):
        (delivery,) = setup.local_engine().train([ClientJob(client, 0, 11 + client, mask)], lambda _: None)
        update = delivery.result
        before = start.tensors()
        moved = sum(float((t - before[n]).square().sum()) for n, t in update.tensors().items()) ** 0.5
        dims = sum(t.numel() for t in update.tensors().values())
        bound = update_norm_bound(
            local.steps, local.lr, optimizer, local.dp.clip, local.dp.noise_multiplier,
            local.batch_size, update.n_examples, dims,
        )
        assert 0 < moved <= bound < 20 * moved


@pytest.mark.parametrize("enabled", [True, False])
def test_micro_batches_give_the_one_pass_step_and_account_once(task_and_view, enabled: bool) -> None:
    """A logical batch in micro-batches of 3: the same clipped mean gradient, one accounted step."""
    task, view = task_and_view
    data = task.encode_train(task.train)
    batch = data[:16]
    params = view.set_trainable({layer: ("A", "B") for layer in view.layers}, train_head=True)
    dp = DPSettings(enabled=enabled, noise_multiplier=0.0, clip=0.05)  # a clip that binds
    grads, histories = {}, {}
    for micro in (0, 3):
        settings = LocalSettings(1, 16, 0.0, "sgd", dp, "rdp", True, micro_batch_size=micro)
        accountant = new_accountant("rdp")
        with private_training(view.model, params, data, 16 / len(data), "sgd", 0.0, dp, accountant, torch.Generator()) as s:
            s.module.train()
            s.optimizer.zero_grad(set_to_none=True)
            _logical_step(s, batch, task.loss, settings)
            grads[micro] = [p.grad.detach().clone() for p in params]
        histories[micro] = accountant.history
    for whole, parts in zip(grads[0], grads[3], strict=True):
        torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-7)
    assert histories[3] == histories[0] == ([(0.0, 16 / len(data), 1)] if enabled else [])


def test_batch_scaling_by_size_gives_every_client_one_rate_and_less_noise(data_dir: Path) -> None:
    """'by_size': q = b / mean size for all; sigma no higher than 'fixed', which calibrates for the smallest."""
    from aslora.experiment import local_settings, plan_privacy

    sizes = [500, 2000, 8000]
    plans = {}
    for scaling in ("fixed", "by_size"):
        config = load_config(REPO / "tests" / "base.toml").with_overrides(
            {"optim.batch_scaling": scaling, "optim.batch_size": 100, "data.num_clients": 3, "federation.clients_per_round": 3}
        )
        local = local_settings(config, sizes, DPSettings(False, 0.0, 1.0))
        plans[scaling] = (local, plan_privacy(config, sizes, local))
    fixed, by_size = plans["fixed"][0], plans["by_size"][0]
    assert [fixed.rate(n) for n in sizes] == [100 / 500, 100 / 2000, 100 / 8000]
    assert {by_size.rate(n) for n in sizes} == {100 / (10500 / 3)}
    assert [by_size.expected_batch(n) for n in sizes] == pytest.approx([n * 300 / 10500 for n in sizes])
    assert plans["by_size"][1].noise_multiplier < plans["fixed"][1].noise_multiplier
    assert plans["by_size"][1].max_sample_rate == pytest.approx(300 / 10500)


def test_batch_scaling_by_size_refuses_a_rate_of_one() -> None:
    from aslora.config import ConfigError
    from aslora.experiment import local_settings

    config = load_config(REPO / "tests" / "base.toml").with_overrides({"optim.batch_scaling": "by_size", "optim.batch_size": 600})
    with pytest.raises(ConfigError, match="optim.batch_size=600 is not below the mean client size"):
        local_settings(config, [300, 500], DPSettings(False, 0.0, 1.0))


@pytest.mark.parametrize(("n", "b"), [(49, 32), (49, 16)])
def test_one_expected_batch_size_where_opacus_would_round_it_down(task_and_view, n: int, b: int) -> None:
    """Opacus's make_private divides by int(n q), b - 1 at these shard sizes (float rounding); DP-SGD's
    mean, the noise variance nu, the norm bound and the accountant's q must all use q n = b."""
    from torch.utils.data import TensorDataset

    from aslora.privacy import sample_rate

    task, view = task_and_view
    full = task.encode(task.train)
    data = TensorDataset(*(t[:n] for t in full.tensors))
    q = sample_rate(b, n)
    assert int(n * q) == b - 1  # the trap
    params = view.set_trainable({layer: ("B",) for layer in view.layers}, train_head=False)
    dp = DPSettings(enabled=True, noise_multiplier=1.1, clip=0.5)
    accountant = new_accountant("rdp")
    with private_training(view.model, params, data, q, "sgd", 0.1, dp, accountant, torch.Generator().manual_seed(0)) as s:
        assert s.optimizer.expected_batch_size == pytest.approx(b, rel=1e-12)
        assert s.noise_variance == pytest.approx((1.1 * 0.5 / b) ** 2, rel=1e-12)
        s.module.train()
        s.optimizer.zero_grad(set_to_none=True)
        task.loss(s.module, data[:4]).backward()
        s.step()
    assert accountant.history == [(1.1, q, 1)]
    local = LocalSettings(steps=3, lr=0.1, batch_size=b, optimizer="sgd", dp=dp, accountant="rdp", train_head=False)
    assert local.rate(n) == q and local.expected_batch(n) == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epsilon", "nan"], "epsilon must be a finite number above 0"),
        (["--epsilon", "inf"], "epsilon must be a finite number above 0"),
        (["--epsilon", "0"], "epsilon must be a finite number above 0"),
        (["--epsilon", "1e-9"], "out of reach"),
        (["--sigma", "-1"], "sigma must be a finite number >= 0"),
        (["--sigma", "nan", "--sample-rate", "0.01", "--steps", "10"], "sigma must be a finite number >= 0"),
        (["--sigma", "1", "--sample-rate", "2"], "sample rate q = b / n must lie in"),
        (["--sigma", "1", "--delta", "nan"], "delta must lie strictly between 0 and 1"),
    ],
)
def test_privacy_command_refuses_bad_numbers_in_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["privacy", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_delta_at_or_above_one_over_n_is_refused_before_training(tmp_path: Path) -> None:
    from aslora.config import ConfigError
    from aslora.experiment import prepare

    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"privacy.delta": 0.01, "output_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match=r"privacy.delta=0.01 is not below 1/n of the smallest client"):
        prepare(config)


def test_a_given_sigma_above_the_budget_is_refused_before_training(tmp_path: Path) -> None:
    from aslora.config import ConfigError
    from aslora.experiment import prepare

    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"privacy.noise_multiplier": 0.3, "output_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match=r"privacy.noise_multiplier=0.3 spends epsilon=.* above the budget privacy.epsilon=3"):
        prepare(config)


def test_the_run_stops_when_every_client_has_spent_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With a budget that buys only part of the rounds, the server samples no client past it."""
    from dataclasses import replace

    from aslora import experiment

    planned = experiment.plan_privacy

    def smaller_budget(*args, **kwargs):  # type: ignore[no-untyped-def]
        plan = planned(*args, **kwargs)
        return replace(plan, budget=plan.planned_epsilon * 0.9)  # about 3 of the 6 rounds

    monkeypatch.setattr(experiment, "plan_privacy", smaller_budget)
    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path), "federation.rounds": 6, "federation.clients_per_round": 10,
         "optim.batch_scaling": "by_size"},  # one sampling rate: every client reaches the budget together
    )
    with caplog.at_level("WARNING", logger="aslora.server"):
        result = experiment.run_experiment(config)
    summary = result.summary
    assert 0 < summary["rounds_completed"] < 6
    assert summary["stopped_early"] == "every client has spent its privacy budget"
    assert "every client has spent its privacy budget; stopping" in caplog.text
    assert summary["epsilon"] <= 0.9 * 3.0 + 1e-9


def test_with_head_share_takes_the_head_out_of_every_group() -> None:
    a, b, w = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    joint = with_head_share(None, [a, b, w], [w], 0.25)
    assert [([id(p) for p in ps], s) for ps, s in joint] == [([id(a), id(b)], 0.75), ([id(w)], 0.25)]
    split = with_head_share([([a], 0.2), ([b, w], 0.8)], [a, b, w], [w], 0.5)
    assert [([id(p) for p in ps], s) for ps, s in split] == [([id(a)], 0.1), ([id(b)], 0.4), ([id(w)], 0.5)]
    with pytest.raises(ValueError, match="head among the trained parameters"):
        with_head_share(None, [a, b], [w], 0.5)


def test_head_clip_share_bounds_the_heads_step_and_frees_the_adapters(task_and_view) -> None:
    """privacy.head_clip_share h: each example's head gradient is clipped to C sqrt(h), so one
    noiseless SGD step moves the head by at most lr C sqrt(h) b / E; the adapters, no longer
    sharing the clip with the head, move further than under one joint clip."""
    task, view = task_and_view
    data = task.encode(task.train)
    state = GlobalState(
        factors=view.get_factors(), head=view.get_head(), scaling={layer: view.scaling(layer) for layer in view.layers}
    )
    job = ClientJob(0, 0, 7, dict.fromkeys(view.layers, ("B",)))
    clip, share, lr = 1e-3, 0.25, 1.0
    moved = {}
    for h in (None, share):
        settings = LocalSettings(1, 16, lr, "sgd", DPSettings(True, 0.0, clip), "rdp", True, head_clip_share=h)
        update = train_client(view, data, state, job, settings, task.loss)
        head = torch.sqrt(sum(((update.head[k] - state.head[k]) ** 2).sum() for k in state.head))
        adapters = torch.sqrt(sum(((f["B"] - state.factors[layer]["B"]) ** 2).sum() for layer, f in update.factors.items()))
        moved[h] = (float(head), float(adapters), update.examples_seen / settings.expected_batch(len(data)))
    head, adapters, scale = moved[share]
    assert 0 < head <= lr * clip * share**0.5 * scale * (1 + 1e-4)
    assert adapters > 1.2 * moved[None][1]
