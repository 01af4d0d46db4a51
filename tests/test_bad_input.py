"""Bad input fails early with a message that names the problem, and leaves no output behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aslora.cli import app
from aslora.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
BAD_VALUES = [-1, 0, -0.5, 1e12, "nonsense", None, [], ["x"], {"a": 1}, True, float("nan")]


def _leaves(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        path = f"{prefix}{key}"
        keys += _leaves(value, path + ".") if isinstance(value, dict) else [path]
    return keys


def test_fuzzed_configs_fail_only_with_a_config_error_naming_the_key() -> None:
    base = load_config(REPO / "tests" / "base.toml").model_dump(mode="json")
    keys = _leaves(base)
    rng = np.random.default_rng(0)
    failures = 0
    for _ in range(300):
        key = keys[rng.integers(len(keys))]
        value = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        raw = load_config(REPO / "tests" / "base.toml").model_dump(mode="json")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
        try:
            parse_config(raw)
        except ConfigError as exc:
            failures += 1
            section = key.split(".")[0]
            assert section in str(exc) or "clients_per_round" in str(exc), (key, value, str(exc))
        # Any other exception type fails the test by propagating.
    assert failures > 150  # most of these values are impossible somewhere


def _run(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", str(REPO / "tests" / "base.toml"), "--output-dir", str(tmp_path / "runs"), *args])
    return result.exit_code, " ".join(result.output.split())


def test_missing_data_files(tmp_path: Path) -> None:
    (tmp_path / "data" / "glue" / "SST-2").mkdir(parents=True)
    code, output = _run(tmp_path, "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "train.tsv" in output and "dev.tsv" in output
    assert not (tmp_path / "runs").exists()


def test_wrong_model_name(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, not per call
    config = tmp_path / "bad-model.toml"
    config.write_text((REPO / "tests" / "base.toml").read_text().replace('name = "minilm"', 'name = "no-such/model"'))
    result = CliRunner().invoke(app, ["run", str(config), "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "runs")])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "model.name='no-such/model'" in output and "local folder" in output
    assert not (tmp_path / "runs").exists()


def _run_edited_base(tmp_path: Path, data_dir: Path, old: str, new: str) -> str:
    """`aslora run` on tests/base.toml with `old` replaced by `new`: it must fail with exit code 2
    before writing anything; returns its output on one line."""
    config = tmp_path / "edited.toml"
    config.write_text((REPO / "tests" / "base.toml").read_text().replace(old, new))
    result = CliRunner().invoke(app, ["run", str(config), "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and not (tmp_path / "runs").exists()
    return " ".join(result.output.split())


def test_too_little_data_for_the_clients(tmp_path: Path, data_dir: Path) -> None:
    output = _run_edited_base(tmp_path, data_dir, "[data]\n", "[data]\ntrain_subset = 100\n")
    assert "data.num_clients" in output and "data.train_subset" in output


def test_a_rank_above_the_model_width_is_refused_before_training(tmp_path: Path, data_dir: Path) -> None:
    output = _run_edited_base(tmp_path, data_dir, "[lora]\nr = 8\n", "[lora]\nr = 1000\n")
    assert "lora.r=1000 exceeds the smaller dimension" in output and "(384)" in output


def test_a_tsv_line_with_an_extra_field_is_named_by_file_and_line(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    lines = (data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[:40]
    lines[5] += "\tstray"
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    (folder / "dev.tsv").write_text((data_dir / "glue" / "SST-2" / "dev.tsv").read_text())
    result = CliRunner().invoke(app, ["run", str(REPO / "tests" / "base.toml"), "--data-dir", str(tmp_path),
                                      "--output-dir", str(tmp_path / "runs")])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "train.tsv is not a GLUE TSV file" in output and "line 6" in output
    assert "Traceback" not in output


def test_compare_refuses_no_seeds_and_no_methods() -> None:
    for args in (["--seeds", "0"], ["--methods", ","]):
        result = CliRunner().invoke(app, ["compare", str(REPO / "tests" / "base.toml"), *args])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert ("--seeds 0" in result.output) or ("names no method" in result.output)


def test_resume_of_something_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in " ".join(result.output.split())


def test_empty_texts_are_named_before_training(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "data" / "glue" / "SST-2"
    folder.mkdir(parents=True)
    lines = (data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[:200]
    (folder / "train.tsv").write_text("\n".join([*lines, "\t1", *lines[1:5]]) + "\n")
    (folder / "dev.tsv").write_text("\n".join((data_dir / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[:20]) + "\n")
    code, output = _run(tmp_path, "--data-dir", str(tmp_path / "data"))
    named = f"{folder / 'train.tsv'}: 1 example(s) have an empty text in 'sentence' (first at line 201)"
    assert code == 2 and named in output
    assert not (tmp_path / "runs").exists()


def test_an_update_beyond_the_dp_norm_bound_is_rejected_and_charged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client whose factors moved farther than its DP-SGD round can move them (a bug, or an
    attack) is rejected with the distance and the bound, and still charged: it trained."""
    import torch

    from aslora.checkpoint import load_checkpoint
    from aslora.engines.local import LocalEngine
    from aslora.experiment import run_experiment

    class Inflating(LocalEngine):
        def train(self, jobs, done):  # type: ignore[no-untyped-def]
            deliveries = super().train(jobs, done)
            for factors in deliveries[0].result.factors.values():
                for name in factors:
                    factors[name] = factors[name] + 50.0
            return deliveries

    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path), "method": "ffa", "federation.rounds": 1}
    )
    with caplog.at_level("WARNING", logger="aslora.server"):
        result = run_experiment(config, engine=lambda s: s.local_engine(Inflating))
    (record,) = result.records
    assert any("beyond the" in r.message and "DP-SGD round allows" in r.message for r in caplog.records)
    assert record.rejected == record.clients[:1]
    histories = dict(load_checkpoint(result.directory).server["histories"])
    assert all(len(histories[c]) == 1 for c in record.clients)
    assert torch.isfinite(torch.tensor(record.train_loss))


def test_a_single_class_training_set_is_named_before_training(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "data" / "glue" / "RTE"
    folder.mkdir(parents=True)
    lines = (data_dir / "glue" / "RTE" / "train.tsv").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.endswith("\tentailment")][:100]
    (folder / "train.tsv").write_text("\n".join(kept) + "\n")
    (folder / "dev.tsv").write_text((data_dir / "glue" / "RTE" / "dev.tsv").read_text())
    config = tmp_path / "rte.toml"
    config.write_text((REPO / "configs" / "glue-rte-minilm.toml").read_text())
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(config), "--data-dir", str(tmp_path / "data"), "--output-dir", str(out)])
    assert result.exit_code != 0
    assert "GLUE/RTE train: every example has label 0" in result.output and "two classes" in result.output
    assert not out.exists()


def test_single_class_clients_are_ordinary_non_iid_data(tmp_path: Path, data_dir: Path) -> None:
    """Dirichlet alpha 0.01 gives each of two clients one class only: a valid, extreme split that runs."""
    from aslora.experiment import prepare, run_experiment

    config = load_config(REPO / "tests" / "base.toml").with_overrides(
        {
            "output_dir": str(tmp_path), "data.dir": str(data_dir), "data.num_clients": 2,
            "federation.clients_per_round": 2, "data.train_subset": 400, "data.eval_subset": 64,
            "data.dirichlet_alpha": 0.01, "optim.batch_size": 16, "model.max_length": 32,
            "federation.rounds": 1, "federation.local_steps": 2, "method": "aslora",
        }
    )
    assert sorted(tuple(set(s["label"])) for s in prepare(config).shards) == [(0,), (1,)]
    result = run_experiment(config)
    assert result.summary["rounds_completed"] == 1 and result.records[0].rejected == []


def test_a_client_that_under_reports_its_privacy_cost_is_rejected_and_charged_the_plan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server charges the cost of the job it sent, never the client's own account of it."""
    from aslora.checkpoint import load_checkpoint
    from aslora.engines.local import LocalEngine
    from aslora.experiment import run_experiment

    class UnderReporting(LocalEngine):
        def train(self, jobs, done):  # type: ignore[no-untyped-def]
            deliveries = super().train(jobs, done)
            sigma, rate, _ = deliveries[0].result.privacy_history[0]
            deliveries[0].result.privacy_history = [(sigma * 10, rate, 1)]  # claims far less than it spent
            return deliveries

    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path), "method": "ffa", "federation.rounds": 1}
    )
    with caplog.at_level("WARNING", logger="aslora.server"):
        result = run_experiment(config, engine=lambda s: s.local_engine(UnderReporting))
    (record,) = result.records
    assert any("reported privacy history" in r.message for r in caplog.records)
    assert record.rejected == record.clients[:1]
    histories = dict(load_checkpoint(result.directory).server["histories"])
    plan = json.loads((result.directory / "config.json").read_text())["privacy_plan"]
    for client in record.clients:  # the honest client and the liar alike: sigma, b / n, local steps
        rate = config.optim.batch_size / plan["client_sizes"][client]
        assert histories[client] == [[plan["noise_multiplier"], pytest.approx(rate, rel=1e-12), config.federation.local_steps]]


def test_a_binary_config_a_negative_seed_a_float_label_and_a_header_only_tsv_get_one_clear_line(tmp_path: Path, data_dir: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(128, 256)))
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text((data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[0] + "\n")
    (folder / "dev.tsv").write_text((data_dir / "glue" / "SST-2" / "dev.tsv").read_text())
    floats = tmp_path / "floats" / "glue" / "SST-2"
    floats.mkdir(parents=True)
    rows = (data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[:40]
    rows[7] = rows[7].rsplit("\t", 1)[0] + "\t0.5"  # one float label must be named alone, at its row
    (floats / "train.tsv").write_text("\n".join(rows) + "\n")
    (floats / "dev.tsv").write_text((data_dir / "glue" / "SST-2" / "dev.tsv").read_text())
    base = str(REPO / "tests" / "base.toml")
    cases = [
        (["run", base, "--data-dir", str(tmp_path / "floats"), "--output-dir", str(tmp_path / "runs")],
         f"{floats / 'train.tsv'}: 1 example(s) have a label outside ['0', '1'] (first at line 8: '0.5')"),
        (["run", str(binary)], "binary.toml is not a text file"),
        (["run", base, "--seed", "-1"], "'seed': Input should be greater than or equal to 0"),
        (["run", base, "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "runs")], "train.tsv holds no examples"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and message in output and "Traceback" not in output, (args, output)


def test_a_client_that_failed_is_not_marked_synchronised(tmp_path: Path) -> None:
    """RoLoRA changes B in round 0 and A in round 1: in round 2 a synchronised client needs A alone,
    but one that dropped out of round 1 never received B's change, so it gets both."""
    from aslora.experiment import run_experiment

    def rows(dropout: float) -> list[dict]:
        config = load_config(REPO / "configs" / "synthetic.toml").with_overrides({
            "output_dir": str(tmp_path / str(dropout)), "method": "rolora", "federation.rounds": 3,
            "federation.clients_per_round": 10, "federation.dropout": dropout,
        })
        run = run_experiment(config).directory
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    healthy, faulty = rows(0.0), rows(0.3)
    # Every client builds the seeded initial state itself: round 0's download is the job alone.
    job_bytes = healthy[0]["bytes_down_per_client"]
    b_bytes, a_bytes = healthy[1]["bytes_down_per_client"], healthy[2]["bytes_down_per_client"]
    assert 0 < job_bytes < 0.5 * min(a_bytes, b_bytes)
    missed = set(faulty[1]["rejected"])  # dropped out of round 1; all 10 are sampled in round 2
    assert missed and faulty[1]["bytes_down_per_client"] == b_bytes
    # A and B travel in one message with one job header: B's tensors are added, not its header.
    expected = a_bytes + len(missed) * (b_bytes - job_bytes) / 10
    assert faulty[2]["bytes_down_per_client"] == pytest.approx(expected, rel=0.01)
    assert faulty[2]["bytes_down_per_client"] > a_bytes + 0.9 * len(missed) * (b_bytes - job_bytes) / 10


def test_a_run_directory_that_cannot_be_written_mid_run_gets_one_line_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at round 2: exit 2, the file and the fix named, and round 1's checkpoint resumes."""
    from aslora.results import RunDirectory

    original, calls = RunDirectory.append_record, []

    def full_disk(self: RunDirectory, record: object) -> None:
        calls.append(record)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(self.path / "metrics.jsonl"))
        original(self, record)

    monkeypatch.setattr(RunDirectory, "append_record", full_disk)
    args = ["run", str(REPO / "configs" / "synthetic.toml"), "--rounds", "3", "--output-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert "metrics.jsonl (No space left on device): free space or make it writable" in output
    assert "keeps the checkpoint of its last finished round: then `aslora run --resume" in output
    monkeypatch.setattr(RunDirectory, "append_record", original)
    (run,) = (tmp_path / "runs").iterdir()
    resumed = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 3
