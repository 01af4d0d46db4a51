"""Checkpoints after every round; a run killed with SIGKILL resumes to the same final adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import as_toml, metric_rows
from safetensors.torch import load_file

from aslora.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from aslora.config import ExperimentConfig
from aslora.experiment import run_experiment
from aslora.protocol import GlobalState


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tiny_config: ExperimentConfig, tmp_path: Path) -> None:
    config = tiny_config.with_overrides(
        {"method": "aslora", "privacy.noise_multiplier": 2.0, "federation.rounds": 4, "federation.eval_every": 2}
    )
    reference = run_experiment(config.with_overrides({"output_dir": str(tmp_path / "reference")}))
    assert load_checkpoint(reference.directory).rounds_done == 4

    config_file = tmp_path / "run.toml"
    config_file.write_text(as_toml(config.with_overrides({"output_dir": str(tmp_path / "killed")})))
    command = [sys.executable, "-m", "aslora", "run"]
    victim = subprocess.Popen([*command, str(config_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    run = None
    while time.monotonic() < deadline and victim.poll() is None:
        manifests = list((tmp_path / "killed").glob("*/checkpoint.json"))
        if manifests and json.loads(manifests[0].read_text())["rounds_done"] >= 1:
            run = manifests[0].parent
            break
        time.sleep(0.05)
    assert run is not None and victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = load_checkpoint(run)
    assert 1 <= killed.rounds_done < 4 and not (run / "summary.json").exists() and killed.wall_s > 0
    # what a kill during a save would leave: a manifest never committed, tensors never named
    (run / "checkpoint.json.partial").write_text("{")
    (run / "checkpoint-00099.safetensors").write_bytes(b"half")

    resumed = subprocess.run([*command, "--resume", str(run)], capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    final, expected = _adapter(run), _adapter(reference.directory)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    assert [r["round"] for r in metric_rows(run)] == [0, 1, 2, 3]
    assert [r["epsilon"] for r in metric_rows(run)] == [r["epsilon"] for r in metric_rows(reference.directory)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 4
    assert summary["wall_time_s"] > killed.wall_s  # both segments, not the last one alone
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint-00004.safetensors", "checkpoint.json"]


def test_checkpoint_round_trip_keeps_tensors_keys_and_types(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = GlobalState(
        factors={"l": {"A": torch.randn(2, 3, generator=gen), "B": torch.randn(4, 2, generator=gen)}},
        head={"w": torch.randn(3, generator=gen)},
        scaling={"l": 2.0},
        memory={"personal": {7: {"B": {"l": torch.ones(4, 2)}, "head": {}}}, "ema": {"l": {"A": 0.5}}, "merges": 3},
        residual={"l": torch.randn(4, 3, generator=gen)},
    )
    save_checkpoint(tmp_path, Checkpoint(2, state, {"histories": [[7, [[1.0, 0.1, 5]]]]}, {"accuracy": 0.5}))
    save_checkpoint(tmp_path, Checkpoint(3, state, {"histories": []}, {"accuracy": 0.5}))
    assert [p.name for p in tmp_path.glob("checkpoint-*.safetensors")] == ["checkpoint-00003.safetensors"]
    loaded = load_checkpoint(tmp_path)
    assert loaded.rounds_done == 3 and loaded.initial_metrics == {"accuracy": 0.5}
    for name, tensor in state.tensors().items():
        assert torch.equal(loaded.state.tensors()[name], tensor)
    assert torch.equal(loaded.state.memory["personal"][7]["B"]["l"], torch.ones(4, 2))  # int key kept
    assert loaded.state.memory["ema"] == {"l": {"A": 0.5}} and loaded.state.memory["merges"] == 3
    assert loaded.state.scaling == {"l": 2.0}
    assert load_checkpoint(tmp_path / "missing") is None


def _finished_synthetic(tmp_path: Path, **overrides: object) -> Path:
    from aslora.config import load_config

    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path / "runs"), "federation.rounds": 2, "method": "ffa"} | overrides
    )
    return run_experiment(config).directory


def test_an_extension_re_plans_the_noise_within_the_stored_budget(caplog) -> None:
    """Half of a 4-round plan done, extended to 6: the last 4 rounds get a larger sigma, the first
    2 keep theirs, and the composed epsilon is the budget, by Opacus's accountant."""
    import pytest

    from aslora.client import LocalSettings
    from aslora.config import ConfigError, load_config
    from aslora.experiment import extend_privacy, plan_privacy, planned_steps
    from aslora.privacy import DPSettings, restore_accountant, spent_epsilon

    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "configs" / "synthetic.toml").with_overrides({"federation.rounds": 4})
    local = LocalSettings(config.federation.local_steps, config.optim.batch_size, 0.1, "sgd",
                          DPSettings(False, 0.0, 1.0), "rdp", True)
    sizes = [400] * config.data.num_clients
    plan = plan_privacy(config, sizes, local)
    longer = config.with_overrides({"federation.rounds": 6})
    extended = extend_privacy(plan, longer, rounds_done=2)
    (first, sigma), (resumed_at, later) = extended.segments
    assert (first, sigma, resumed_at) == (0, plan.noise_multiplier, 2) and later > sigma
    q, before = plan.max_sample_rate, planned_steps(config, 2)
    history = [(sigma, q, before), (later, q, planned_steps(longer, 6) - before)]
    assert spent_epsilon(restore_accountant("rdp", history), config.privacy.delta) == pytest.approx(
        config.privacy.epsilon, rel=1e-6
    )
    assert extended.planned_epsilon == pytest.approx(config.privacy.epsilon, rel=1e-6)
    assert not caplog.records
    finished = extend_privacy(plan, longer, rounds_done=4)  # the whole plan done: the calibration's slack is left
    assert finished.segments[-1][1] > 4 * sigma and "mostly noise" in caplog.text
    assert finished.planned_epsilon <= config.privacy.epsilon * (1 + 1e-6)
    spent = config.with_overrides({"privacy.epsilon": plan.planned_epsilon * 0.999, "federation.rounds": 6})
    with pytest.raises(ConfigError, match="budget cannot grow inside a run"):
        extend_privacy(plan, spent, rounds_done=4)  # a budget already spent leaves no room at all


def test_resume_refuses_an_edited_config_naming_the_keys(tmp_path: Path) -> None:
    """A raised budget in config.json must not go unnoticed: the checkpoint is the record."""
    import pytest

    from aslora.config import ConfigError

    run = _finished_synthetic(tmp_path)
    stored = json.loads((run / "config.json").read_text())
    stored["config"]["federation"]["rounds"] = 5
    stored["config"]["privacy"]["epsilon"] = 10.0
    stored["config"]["method"] = "rolora"
    (run / "config.json").write_text(json.dumps(stored))
    from aslora.cli import _resumed_config

    with pytest.raises(ConfigError) as err:
        run_experiment(_resumed_config(run), resume=run)
    message = str(err.value)
    assert "federation.rounds (2 -> 5)" in message and "privacy.epsilon (3.0 -> 10.0)" in message
    assert "method ('ffa' -> 'rolora')" in message


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default(tmp_path: Path) -> None:
    """A setting added after a run started (here model.normalize) reads as its default in the
    checkpoint's record, so the run resumes; a value that really changed is still refused."""
    import dataclasses

    import pytest

    from aslora.config import ConfigError
    from aslora.experiment import check_resumable
    from aslora.results import RunDirectory

    run = _finished_synthetic(tmp_path)
    checkpoint = load_checkpoint(run)
    assert checkpoint is not None and checkpoint.config is not None
    older = json.loads(json.dumps(checkpoint.config))
    del older["model"]["normalize"]
    config = ExperimentConfig.model_validate(checkpoint.config)
    check_resumable(RunDirectory(run), dataclasses.replace(checkpoint, config=older), config)
    with pytest.raises(ConfigError, match=r"privacy.epsilon \(3.0 -> 10.0\)"):
        check_resumable(RunDirectory(run), dataclasses.replace(checkpoint, config=older),
                        config.with_overrides({"privacy.epsilon": 10.0}))


def test_resume_refuses_metrics_without_a_checkpoint_and_keeps_them(tmp_path: Path) -> None:
    import pytest

    from aslora.cli import _resumed_config
    from aslora.config import ConfigError

    run = _finished_synthetic(tmp_path)
    before = (run / "metrics.jsonl").read_text()
    (run / "checkpoint.json").unlink()
    with pytest.raises(ConfigError, match="2 rounds in metrics.jsonl but no checkpoint.json"):
        run_experiment(_resumed_config(run), resume=run)
    assert (run / "metrics.jsonl").read_text() == before  # nothing cut back


def test_an_unreadable_checkpoint_is_named_with_how_to_go_on(tmp_path: Path) -> None:
    import pytest

    from aslora.checkpoint import CheckpointError

    run = _finished_synthetic(tmp_path)
    for broken in ("{}", "{not json"):
        (run / "checkpoint.json").write_text(broken)
        with pytest.raises(CheckpointError, match=r"checkpoint.json .* cannot be read.*start it again"):
            load_checkpoint(run)
    (run / "checkpoint.json").write_text(json.dumps({"tensor_file": "checkpoint-00002.safetensors"}))
    tensors = run / "checkpoint-00002.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(run)


def test_resume_with_other_flags_is_an_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from aslora.cli import app

    run = _finished_synthetic(tmp_path)
    for extra in (["--rounds", "80", "--epsilon", "10"], ["configs/demo.toml"], ["--seed", "3"]):
        result = CliRunner().invoke(app, ["run", *extra, "--resume", str(run)])
        assert result.exit_code == 2 and "--resume continues a run with the settings it started with" in result.output


def test_resume_with_rounds_extends_a_run_and_says_so(tmp_path: Path) -> None:
    """`--resume X --rounds N`: N rounds in all, the sigma of each segment in summary.json, and the
    files agree again, even after a stop between writing config.json and the checkpoint."""
    from typer.testing import CliRunner

    from aslora.cli import _resumed_config, app

    run = _finished_synthetic(tmp_path, **{"privacy.noise_multiplier": 2.0, "privacy.epsilon": 50.0})
    stored = json.loads((run / "config.json").read_text())
    stored["config"]["federation"]["rounds"] = 3  # as left by an extension stopped before its checkpoint
    (run / "config.json").write_text(json.dumps(stored))
    result = CliRunner().invoke(app, ["run", "--resume", str(run), "--rounds", "3"])
    assert result.exit_code == 0, result.output
    assert "extended run: sigma 2 from round 1, sigma 2 from round 3, within the budget epsilon = 50" in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["rounds_completed"], summary["rounds_planned"]) == (3, 3)
    assert summary["noise_multiplier_by_segment"] == [
        {"first_round": 0, "noise_multiplier": 2.0}, {"first_round": 2, "noise_multiplier": 2.0}
    ]
    epsilons = [row["epsilon"] for row in metric_rows(run)]
    assert len(epsilons) == 3 and epsilons[0] < epsilons[1] < epsilons[2] <= 50
    assert load_checkpoint(run).config["federation"]["rounds"] == 3
    assert json.loads((run / "config.json").read_text())["privacy_plan"]["segments"] == [[0, 2.0], [2, 2.0]]
    run_experiment(_resumed_config(run), resume=run)  # a plain resume agrees with the record again
    again = CliRunner().invoke(app, ["run", "--resume", str(run), "--rounds", "3"])
    assert again.exit_code == 2 and "already plans 3 rounds" in again.output
