"""What crosses the wire is what the method says, the bytes recorded are those sent, and a client
starts from what it was sent (issue 17.4). The synthetic task keeps these runs to seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from aslora.checkpoint import load_checkpoint
from aslora.config import ExperimentConfig, load_config
from aslora.engines.local import LocalEngine
from aslora.experiment import prepare, run_experiment
from aslora.protocol import Delivery, unpack
from aslora.replica import Replica

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, method: str, rounds: int = 3, **overrides: object) -> ExperimentConfig:
    return load_config(REPO / "configs" / "synthetic.toml").with_overrides({
        "output_dir": str(tmp_path), "method": method, "federation.rounds": rounds, "data.probe_size": 0,
        **overrides,
    })


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class _Recording(LocalEngine):
    """The local engine, keeping every message it sends and receives."""

    sent: ClassVar[list[tuple[int, bytes]]] = []

    def _round_trip(self, sent: bytes) -> Delivery:
        delivery = super()._round_trip(sent)
        _Recording.sent.append((delivery.bytes_down, sent))
        return delivery


def test_recorded_bytes_are_the_lengths_of_the_messages_sent(tmp_path: Path) -> None:
    _Recording.sent = []
    result = run_experiment(_config(tmp_path, "rolora", rounds=2, **{"federation.clients_per_round": 10}),
                            engine=lambda s: s.local_engine(_Recording))
    rows = _rows(result.directory)
    assert all(size == len(blob) for size, blob in _Recording.sent)
    per_round = [_Recording.sent[:10], _Recording.sent[10:]]
    for row, messages in zip(rows, per_round, strict=True):
        assert row["bytes_down_per_client"] == pytest.approx(sum(len(b) for _, b in messages) / 10)
    first, second = (unpack(blob)[0] for _, blob in (per_round[0][0], per_round[1][0]))
    assert first == {}  # every client builds the seeded initial state itself
    assert second and all(name.endswith("lora_B") for name in second)  # RoLoRA trained B in round 0


def _killed_after(round_index: int):  # type: ignore[no-untyped-def]
    class Dying(LocalEngine):
        def train(self, jobs, done):  # type: ignore[no-untyped-def]
            if jobs[0].round_index == round_index:
                raise KeyboardInterrupt  # the process dies between two checkpoints
            return super().train(jobs, done)

    return lambda s: s.local_engine(Dying)


@pytest.mark.parametrize("method", ["rolora", "fedsa"])
def test_a_resumed_run_resends_what_its_restarted_clients_lack_and_ends_the_same(tmp_path: Path, method: str) -> None:
    """A resume restarts the clients at the seeded initial state: the next download carries every
    tensor that changed since, and FedSA's clients get back their own B from the checkpoint."""
    overrides: dict[str, object] = {"federation.clients_per_round": 10}  # every client synchronised each round
    if method == "fedsa":
        overrides["data.holdout_fraction"] = 0.1
    whole = run_experiment(_config(tmp_path / "whole", method, **overrides))
    config = _config(tmp_path / "cut", method, **overrides)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, engine=_killed_after(2))
    (run,) = (tmp_path / "cut").iterdir()
    resumed = run_experiment(config, resume=run)
    assert resumed.summary["final_metrics"] == whole.summary["final_metrics"]
    before, after = _rows(whole.directory)[2], _rows(resumed.directory)[2]
    if method == "rolora":  # round 1 changed A alone; the restarted clients also lack B
        assert after["bytes_down_per_client"] > 1.7 * before["bytes_down_per_client"]


def test_fedsa_keeps_b_on_the_clients_and_scores_them_there(tmp_path: Path) -> None:
    config = _config(tmp_path, "fedsa", **{"data.holdout_fraction": 0.1, "federation.clients_per_round": 10})
    result = run_experiment(config)
    initial = prepare(config).initial
    checkpoint = load_checkpoint(result.directory)
    for layer, factors in checkpoint.state.factors.items():  # the server's own state: B never arrived
        assert torch.equal(factors["B"], initial.factors[layer]["B"])
        assert not torch.equal(factors["A"], initial.factors[layer]["A"])
    assert set(checkpoint.clients) == set(range(10))  # the simulated clients' disks
    assert all(name.endswith("lora_B") for kept in checkpoint.clients.values() for name in kept)
    rows = _rows(result.directory)
    assert all("personal_rel_error" in r["metrics"] for r in rows)
    assert result.summary["dev_model"].startswith("an evaluation-only view")
    fedavg = run_experiment(_config(tmp_path / "fedavg", "fedavg", **{"federation.clients_per_round": 10}))
    b_bytes = sum(f["B"].numel() * f["B"].element_size() for f in initial.factors.values())
    saved = fedavg.summary["mean_bytes_up_per_client"] - result.summary["mean_bytes_up_per_client"]
    assert saved >= b_bytes  # FedSA's reply carries no B


class _Restarting(LocalEngine):
    """The local engine, where client 0's replica is lost before round 2 (a restarted SuperNode)."""

    def train(self, jobs, done):  # type: ignore[no-untyped-def]
        if jobs[0].round_index == 2:
            self.replicas[0] = Replica(self.initial)
        return super().train(jobs, done)


def test_a_client_that_lost_its_replica_refuses_the_download_and_is_resent_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Never train from the wrong model: a download that builds on a round the client lacks is
    refused, and the next one carries everything since the seeded initial."""
    config = _config(tmp_path, "rolora", rounds=4, **{"federation.clients_per_round": 10})
    with caplog.at_level("WARNING", logger="aslora.server"):
        result = run_experiment(config, engine=lambda s: s.local_engine(_Restarting))
    rows = _rows(result.directory)
    assert rows[2]["rejected"] == [0] and rows[3]["rejected"] == []
    assert any("client 0" in r.message and "replica was lost" in r.message for r in caplog.records)
    # round 3: nine clients need round 2's change (B), client 0 the A and B of everything since
    assert rows[3]["bytes_down_per_client"] > rows[1]["bytes_down_per_client"]
