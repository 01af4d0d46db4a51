"""End to end on real MiniLM and real SST-2: learning, DP accounting, outputs, adapter export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import as_toml, metric_rows
from opacus.accountants import RDPAccountant
from peft import PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from aslora.adapters import LoraView
from aslora.checkpoint import load_checkpoint
from aslora.cli import app
from aslora.client import LocalSettings, train_client
from aslora.config import ConfigError, ExperimentConfig, parse_config
from aslora.experiment import run_experiment, warn_if_long
from aslora.pretrained import resolve_model
from aslora.privacy import RDP_ORDERS, DPSettings
from aslora.protocol import ClientJob, GlobalState
from aslora.server import mean_by_step
from aslora.tasks import load_task
from aslora.tasks.pooling import pooled_classifier

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["fedavg", "ffa"])
def test_two_rounds_without_noise_improve_over_the_untrained_model(tiny_config: ExperimentConfig, method: str) -> None:
    # IID clients, Adam and the mean-pooled embedding MiniLM was trained for: this
    # checks that the federation learns, with settings under which it learns in a few steps.
    overrides = {
        "method": method,
        "data.partition": "iid",
        "optim.optimizer": "adam",
        "optim.lr": 0.01,
        "optim.batch_size": 32,
        "federation.local_steps": 6,
    }
    raw = tiny_config.with_overrides(overrides).model_dump(mode="json")
    raw["privacy"].update(epsilon=None, noise_multiplier=0.0)  # DP-SGD's clipping, no noise
    result = run_experiment(parse_config(raw))
    initial, final = result.summary["initial_metrics"], result.summary["final_metrics"]
    assert final["accuracy"] > initial["accuracy"] + 0.1
    assert result.summary["epsilon"] == float("inf")  # no noise buys no privacy, and says so


def _reconstructed_epsilon(run: Path, rounds_done: int) -> float:
    """Opacus's RDP epsilon rebuilt from what the run logged: sizes, sigma, participations."""
    stored = json.loads((run / "config.json").read_text())
    plan, config = stored["privacy_plan"], stored["config"]
    rows = metric_rows(run)[:rounds_done]
    worst = 0.0
    for client, n in enumerate(plan["client_sizes"]):
        joined = sum(client in r["clients"] and client not in r["rejected"] for r in rows)
        if not joined:
            continue
        accountant = RDPAccountant()
        q = min(1.0, config["optim"]["batch_size"] / n)
        accountant.history = [(plan["noise_multiplier"], q, config["federation"]["local_steps"])] * joined
        worst = max(worst, accountant.get_epsilon(config["privacy"]["delta"], alphas=list(RDP_ORDERS)))
    return worst


def test_cli_compare_with_dp_writes_every_output(tiny_config: ExperimentConfig, tmp_path: Path) -> None:
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(as_toml(tiny_config))
    result = CliRunner().invoke(app, ["compare", str(config_file), "--methods", "fedavg,ffa", "--seeds", "1", "--target", "0.5"])
    assert result.exit_code == 0, result.output
    assert "fedavg" in result.output and "ffa" in result.output and "rounds to 0.5" in result.output

    out = Path(tiny_config.output_dir)
    runs = sorted(p for p in out.iterdir() if (p / "summary.json").exists())
    assert len(runs) == 2
    assert len(list(out.glob("compare-*/comparison.png"))) == 1
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        rows = metric_rows(run)
        assert len(rows) == 2 and (run / "metrics.png").stat().st_size > 0
        for key in ("train_loss", "epsilon", "agg_error", "agg_time_s", "bytes_up_per_client", "bytes_down_per_client"):
            assert all(key in r for r in rows)
        # The round's loss step by step: one mean per local step, around the round's mean loss.
        steps = tiny_config.federation.local_steps
        for r in rows:
            by_step = [loss for loss in r["train_loss_by_step"] if loss is not None]
            assert len(r["train_loss_by_step"]) == steps and by_step
            assert min(by_step) - 1e-9 <= r["train_loss"] <= max(by_step) + 1e-9
        # Times: the server's part of a round (plan, checks, aggregation) next to the clients' training.
        assert all(0 < r["agg_time_s"] <= r["server_time_s"] < r["client_time_s"] for r in rows)
        assert summary["total_client_time_s"] == pytest.approx(sum(r["client_time_s"] for r in rows))
        assert all("accuracy" in r["metrics"] for r in rows)
        # Privacy: the logged epsilon is Opacus's for the logged history, within the budget.
        for i, row in enumerate(rows):
            assert row["epsilon"] == pytest.approx(_reconstructed_epsilon(run, i + 1), rel=1e-9)
        assert 0 < summary["epsilon"] <= tiny_config.privacy.epsilon
        assert summary["noise_multiplier"] > 0
        # Bytes: FFA uploads only B (plus head), so half of FedAvg's factor bytes.
        if summary["method"] == "ffa":
            assert all(r["mask"] and all(m == ["B"] for m in r["mask"].values()) for r in rows)
            assert summary["mean_agg_error"] < 1e-6
        else:
            assert summary["mean_agg_error"] > 0
        _assert_adapter_reloads(run, tiny_config.with_overrides({"method": summary["method"]}), summary)


def test_cli_compare_runs_side_by_side_each_method_with_its_own_settings(
    tiny_config: ExperimentConfig, tmp_path: Path
) -> None:
    """--workers 2: one process per run; a [per_method] table reaches its method's run alone."""
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(as_toml(tiny_config.with_overrides({"federation.rounds": 1})) + "[per_method.ffa]\noptim.lr = 0.25\n")
    result = CliRunner().invoke(app, ["compare", str(config_file), "--methods", "fedavg,ffa", "--workers", "2"])
    assert result.exit_code == 0, result.output
    used = {}
    for run in Path(tiny_config.output_dir).glob("*/config.json"):
        config = json.loads(run.read_text())["config"]
        used[config["method"]] = config["optim"]["lr"]
        assert config["per_method"] == {}  # what the run used, tables applied
    assert used == {"fedavg": tiny_config.optim.lr, "ffa": 0.25}
    assert "fedavg" in result.output and "ffa" in result.output


@pytest.mark.parametrize("method", ["aslora", "fedex", "flora"])
def test_every_export_reloads_by_peft_to_the_final_models_logits(
    tiny_config: ExperimentConfig, method: str
) -> None:
    """FedEx-LoRA and FLoRA fold updates into W0: their export is W0 + residual.safetensors + adapter
    (README, "What a run writes"). Each reload must give the logits of the final global model."""
    config = tiny_config.with_overrides({"method": method, "federation.rounds": 1})
    run = run_experiment(config).directory
    task = load_task(config)
    batch = task.encode(task.eval)[:32]
    final = load_checkpoint(run).state
    view = LoraView(task.build_model(config))
    view.set_factors(final.factors)
    view.set_head(final.head)
    view.set_residual(final.residual)
    view.model.eval()
    base = pooled_classifier(resolve_model("minilm"), "mean", 2)
    residual = run / "residual.safetensors"
    assert residual.is_file() == (method in ("fedex", "flora"))
    if residual.is_file():
        with torch.no_grad():
            deltas = load_file(str(residual))
            assert max(float(d.abs().max()) for d in deltas.values()) > 0  # something was folded in
            for layer, delta in deltas.items():
                base.get_submodule(layer).weight += delta
    reloaded = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        expected = view.model(**task._inputs(batch)).logits
        got = reloaded(**task._inputs(batch)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_an_averaged_runs_export_reloads_to_the_model_its_dev_figures_score(tiny_config: ExperimentConfig) -> None:
    """federation.ema_decay: dev scores the average over rounds, so the export is that average
    (W0 + residual.safetensors + adapter), not the last round's model."""
    config = tiny_config.with_overrides({"method": "aslora", "federation.ema_decay": 0.5})
    result = run_experiment(config)
    run, summary = result.directory, result.summary
    base = pooled_classifier(resolve_model("minilm"), "mean", 2)
    with torch.no_grad():
        for layer, delta in load_file(str(run / "residual.safetensors")).items():
            base.get_submodule(layer).weight += delta
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    task = load_task(config)
    metrics = task.evaluate(model, task.encode(task.eval), 64)
    assert metrics["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_loss"], rel=1e-5)
    last = load_checkpoint(run).state  # the last round's model scores otherwise
    view = LoraView(task.build_model(config))
    view.set_factors(last.factors)
    view.set_head(last.head)
    assert task.evaluate(view.model, task.encode(task.eval), 64)["eval_loss"] != pytest.approx(
        summary["final_metrics"]["eval_loss"], rel=1e-5
    )


def _assert_adapter_reloads(run: Path, config: ExperimentConfig, summary: dict) -> None:
    """The exported adapter, loaded by PEFT alone, gives the run's final logits (via its metrics)."""
    base = pooled_classifier(resolve_model("minilm"), "mean", 2)  # what model.pooling 'auto' builds for MiniLM
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    task = load_task(config)
    metrics = task.evaluate(model, task.encode(task.eval), 64)
    assert metrics["accuracy"] == summary["final_metrics"]["accuracy"]
    assert metrics["eval_loss"] == pytest.approx(summary["final_metrics"]["eval_loss"], rel=1e-5)


def test_without_data_or_network_one_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ASLORA_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "aslora", "run", str(REPO / "configs" / "demo.toml"), "--output-dir", str(tmp_path / "runs")],
        check=False, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = " ".join(proc.stdout.split())
    assert "ASLORA_DATA_DIR" in message and "--data-dir" in message and "glue/" in message
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_missing_local_files_name_the_file(tiny_config: ExperimentConfig, tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    result = CliRunner().invoke(app, ["run", str(REPO / "configs" / "demo.toml"), "--data-dir", str(empty)])
    assert result.exit_code == 2
    assert "train.tsv" in " ".join(result.output.split())


@pytest.mark.parametrize("method", ["fedex", "flora", "fedsvd", "flexlora"])
def test_folding_and_svd_baselines_complete_two_dp_rounds(tiny_config: ExperimentConfig, method: str) -> None:
    result = run_experiment(tiny_config.with_overrides({"method": method}))
    rows = metric_rows(result.directory)
    assert len(rows) == 2 and 0 < result.summary["epsilon"] <= tiny_config.privacy.epsilon
    if method == "flexlora":  # rank-r truncation of a sum of two clients' rank-r products
        assert all(0 < r["agg_error"] < 1 for r in rows)
    else:
        assert all(r["agg_error"] < 1e-5 for r in rows)  # exact
    if method in ("fedex", "flora"):
        # The dense residual travels to the clients: the download outweighs the factors.
        assert rows[1]["bytes_down_per_client"] > 5 * rows[1]["bytes_up_per_client"]
        assert (result.directory / "residual.safetensors").stat().st_size > 0


def test_fedsa_reports_personalised_and_global_metrics(tiny_config: ExperimentConfig) -> None:
    config = tiny_config.with_overrides({"method": "fedsa", "data.holdout_fraction": 0.2})
    result = run_experiment(config)
    rows = metric_rows(result.directory)
    assert all({"accuracy", "personal_accuracy"} <= set(r["metrics"]) for r in rows)
    fedavg = run_experiment(config.with_overrides({"method": "fedavg"}))
    # FedSA uploads A only: half of FedAvg's factors, and no head.
    assert result.summary["mean_bytes_up_per_client"] < 0.6 * fedavg.summary["mean_bytes_up_per_client"]


def test_fedsa_needs_a_held_out_split(tiny_config: ExperimentConfig) -> None:
    with pytest.raises(ConfigError, match="data.holdout_fraction"):
        tiny_config.with_overrides({"method": "fedsa"})


def test_heterogeneous_ranks_keep_their_padding_at_zero_under_dp(tiny_config: ExperimentConfig) -> None:
    config = tiny_config.with_overrides({"method": "flora", "lora.client_ranks": [2, 4, 8, 8]})
    result = run_experiment(config)
    assert result.summary["rounds_completed"] == 2 and result.summary["mean_agg_error"] < 1e-5
    task = load_task(config)
    view = LoraView(task.build_model(config))
    state = GlobalState(factors=view.get_factors(), head=view.get_head(), scaling={layer: view.scaling(layer) for layer in view.layers})
    settings = LocalSettings(
        steps=3, batch_size=16, lr=0.5, optimizer="sgd", dp=DPSettings(True, 1.0, 1.0), accountant="rdp", train_head=True
    )
    mask = dict.fromkeys(view.layers, ("A", "B"))
    update = train_client(view, task.encode(task.train), state, ClientJob(0, 0, 7, mask, rank=2), settings, task.loss)
    for factors in update.factors.values():
        assert torch.count_nonzero(factors["A"][2:]) == 0 and torch.count_nonzero(factors["B"][:, 2:]) == 0
        assert torch.count_nonzero(factors["A"][:2]) > 0 and torch.count_nonzero(factors["B"][:, :2]) > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "fedavg", "lora.client_ranks": [2, 4, 8, 8]}, "need stacking"),
        ({"method": "flora", "lora.client_ranks": [2, 4]}, "one rank per client"),
        ({"method": "flora", "lora.client_ranks": [2, 4, 8, 16]}, "between 1 and lora.r=8"),
    ],
)
def test_heterogeneous_rank_config_errors(tiny_config: ExperimentConfig, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config.with_overrides(overrides)


def test_dropped_clients_are_rejected_and_the_rest_aggregated(tiny_config: ExperimentConfig) -> None:
    config = tiny_config.with_overrides({"federation.clients_per_round": 4, "federation.dropout": 0.5})
    result = run_experiment(config)
    rows = metric_rows(result.directory)
    assert [len(r["rejected"]) for r in rows] == [2, 2]
    assert all(r["examples_seen"] > 0 and r["bytes_up_per_client"] > 0 for r in rows)
    assert result.summary["rejected_updates"] == 4


def test_rounds_below_the_minimum_of_clients_are_skipped(tiny_config: ExperimentConfig) -> None:
    """Half of four clients fail each round; with min_clients = 3 no round is aggregated."""
    config = tiny_config.with_overrides(
        {"federation.clients_per_round": 4, "federation.dropout": 0.5, "federation.min_clients": 3}
    )
    result = run_experiment(config)
    rows = metric_rows(result.directory)
    assert all(r["examples_seen"] == 0 and r["bytes_up_per_client"] == 0 for r in rows)
    assert result.summary["final_metrics"] == result.summary["initial_metrics"]  # the model never moved
    with pytest.raises(ConfigError, match="min_clients=5 exceeds"):
        tiny_config.with_overrides({"federation.min_clients": 5})


def test_stragglers_are_rejected_but_still_charged_for_privacy(tiny_config: ExperimentConfig) -> None:
    """A late update is not averaged in, but its client trained: its epsilon counts the round."""
    config = tiny_config.with_overrides({"federation.clients_per_round": 4, "federation.stragglers": 0.25})
    result = run_experiment(config)
    rows = metric_rows(result.directory)
    assert [len(r["rejected"]) for r in rows] == [1, 1]
    stored = json.loads((result.directory / "config.json").read_text())
    sizes, sigma = stored["privacy_plan"]["client_sizes"], stored["privacy_plan"]["noise_multiplier"]
    worst = 0.0
    for client, n in enumerate(sizes):  # every sampled client trained, late or not
        accountant = RDPAccountant()
        steps, batch = config.federation.local_steps, config.optim.batch_size
        accountant.history = [(sigma, min(1.0, batch / n), steps)] * sum(client in r["clients"] for r in rows)
        if accountant.history:
            worst = max(worst, accountant.get_epsilon(1e-5, alphas=list(RDP_ORDERS)))
    assert rows[-1]["epsilon"] == pytest.approx(worst, rel=1e-9)
    with pytest.raises(ConfigError, match="must stay below 1"):
        tiny_config.with_overrides({"federation.dropout": 0.5, "federation.stragglers": 0.5})


def test_a_run_projected_past_an_hour_is_warned_about(
    tiny_config: ExperimentConfig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warning comes from the measured first round: with the threshold at 1 ms every run passes it."""
    import aslora.experiment

    assert warn_if_long(2.0, 10) == 20.0
    monkeypatch.setattr(aslora.experiment, "LONG_RUN_S", 1e-3)
    with caplog.at_level("WARNING", logger="aslora.experiment"):
        run_experiment(tiny_config.with_overrides({"federation.rounds": 1}))
    assert any("the first round took" in r.message and "1 rounds will take" in r.message for r in caplog.records)


def test_the_mean_by_step_skips_empty_batches_and_short_histories() -> None:
    assert mean_by_step([[1.0, None, 3.0], [2.0, None], []]) == [1.5, None, 3.0]
    assert mean_by_step([]) == []


def test_the_linear_probe_trains_the_head_alone_under_dp(tiny_config: ExperimentConfig) -> None:
    result = run_experiment(tiny_config.with_overrides({"method": "head", "lora.head_init": "zero"}))
    state = load_checkpoint(result.directory).state
    rows = metric_rows(result.directory)
    assert all(not factors for r in rows for factors in r["mask"].values())  # no layer ever trains a factor
    assert all(float(f["B"].abs().max()) == 0.0 for f in state.factors.values())  # the encoder is the pretrained one
    assert all(float(t.abs().max()) > 0 for t in state.head.values())  # the zero head has learned
    assert 0 < result.summary["epsilon"] <= tiny_config.privacy.epsilon


def test_the_linear_probe_needs_a_trained_head() -> None:
    with pytest.raises(ConfigError, match="method 'head'.*lora.train_head = true"):
        parse_config({"method": "head", "lora": {"train_head": False}})
