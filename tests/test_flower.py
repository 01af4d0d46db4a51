"""The same experiment on Flower's simulation engine as on the in-process one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import as_toml, metric_rows
from safetensors.torch import load_file
from typer.testing import CliRunner

from aslora.cli import app
from aslora.config import ExperimentConfig
from aslora.experiment import run_experiment

if TYPE_CHECKING:
    from aslora.engines.flower import FlowerEngine

REPO = Path(__file__).resolve().parents[1]


def _adapter(output: Path) -> dict[str, torch.Tensor]:
    (run,) = [p.parent for p in output.glob("*/summary.json")]
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg+"])
def test_flower_simulation_matches_the_local_engine(
    secure: bool, tiny_config: ExperimentConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`aslora run --engine flower` (a ServerApp and one ClientApp per client on Flower's
    simulation engine) ends with the local engine's adapter, for AS-LoRA under DP; under
    SecAgg+ too, where the server only ever sees the sum."""
    # One of the three clients of every round fails (simulated): Flower reports the
    # error, and the round goes on with the other two (under SecAgg+, the protocol
    # recovers the failed client's masks from the others' shares).
    config = tiny_config.with_overrides(
        {"method": "aslora", "privacy.noise_multiplier": 2.0, "federation.clients_per_round": 3, "federation.dropout": 0.3}
    )
    run_experiment(config.with_overrides({"output_dir": str(tmp_path / "local")}))
    config_file = tmp_path / "tiny.toml"
    flower = {"output_dir": str(tmp_path / "flower"), "federation.secure_aggregation": secure}
    config_file.write_text(as_toml(config.with_overrides(flower)))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    result = CliRunner().invoke(app, ["run", str(config_file), "--engine", "flower"])
    assert result.exit_code == 0, result.output
    (run,) = [p.parent for p in (tmp_path / "flower").glob("*/summary.json")]
    rows = metric_rows(run)
    assert [len(r["rejected"]) for r in rows] == [1, 1] and all(len(r["clients"]) == 3 for r in rows)
    local, flower = _adapter(tmp_path / "local"), _adapter(tmp_path / "flower")
    assert local.keys() == flower.keys()
    for name in local:
        # Ray gives each client process one thread: float sums may differ in the last bits;
        # SecAgg+ sums on a fixed-point grid of 2 * 16 / 2^30 (about 3e-8).
        torch.testing.assert_close(flower[name], local[name], rtol=1e-4, atol=1e-6)
    local_rows = metric_rows(next((tmp_path / "local").glob("*/summary.json")).parent)
    assert [r["mask"] for r in rows] == [r["mask"] for r in local_rows]
    for row, local_row in zip(rows, local_rows, strict=True):  # the clients' own step losses travel too
        assert row["train_loss_by_step"] == pytest.approx(local_row["train_loss_by_step"], rel=1e-4)
    if secure:  # the server cannot measure what it never sees
        assert all(r["agg_error"] is None for r in rows)


class _TwoNodeGrid:
    """A Flower grid on which only the SuperNodes of partitions 0 and 1 ever connect."""

    def get_node_ids(self) -> list[int]:
        return [100, 101]

    def send_and_receive(self, messages: list, timeout: float | None = None) -> list:
        return [
            SimpleNamespace(
                has_error=lambda: False,
                content={"node": {"partition-id": m.metadata.dst_node_id - 100}},
                metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id),
            )
            for m in messages
        ]


def _engine_on(grid: _TwoNodeGrid, config: ExperimentConfig, monkeypatch: pytest.MonkeyPatch) -> FlowerEngine:
    """A FlowerEngine on a fake grid, with a short wait for the SuperNodes."""
    from aslora.engines import flower

    # a real Message needs a running Flower app; the engine only reads where it goes
    def message(content: object, dst_node_id: int, message_type: str) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst_node_id))

    monkeypatch.setattr(flower, "Message", message)
    setup = SimpleNamespace(
        config=config, method=lambda: SimpleNamespace(weight=float), sizes=[10] * config.data.num_clients,
        initial=SimpleNamespace(tensors=dict),
    )
    return flower.FlowerEngine(grid, context=None, setup=setup, wait_s=0.3)


def test_missing_supernodes_are_named_with_the_fix(
    tiny_config: ExperimentConfig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer SuperNodes than clients (flwr run's default of 2): a warning says how many to start,
    and the client without one is rejected with the reason, not waited on for ever."""
    engine = _engine_on(_TwoNodeGrid(), tiny_config, monkeypatch)
    with caplog.at_level("WARNING"):
        engine._ask_unknown_nodes()
    assert engine._node_of(1) == 101
    assert "only 2 of 4 SuperNodes" in caplog.text and "num-supernodes=4" in caplog.text
    with pytest.raises(LookupError, match="partition-id=3"):
        engine._node_of(3)


class _SlowNodeGrid(_TwoNodeGrid):
    """Node 101's ClientApp is still starting at the first query: it answers from the second on."""

    def __init__(self) -> None:
        self.asked: list[list[int]] = []
        self.timeouts: list[float | None] = []

    def send_and_receive(self, messages: list, timeout: float | None = None) -> list:
        self.asked.append([m.metadata.dst_node_id for m in messages])
        self.timeouts.append(timeout)
        replies = super().send_and_receive(messages, timeout)
        return replies if len(self.asked) > 1 else [r for r in replies if r.metadata.src_node_id != 101]


def test_a_silent_supernode_is_asked_again_not_dropped(
    tiny_config: ExperimentConfig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SuperNode that misses the first query (its ClientApp still starting after the round timeout)
    is named in a warning and asked again, alone, in the next round that samples a client without one;
    the query waits as long as a round does."""
    grid = _SlowNodeGrid()
    engine = _engine_on(grid, tiny_config.with_overrides({"data.num_clients": 2}), monkeypatch)
    with caplog.at_level("WARNING"):
        engine._ask_unknown_nodes()
    assert engine._node_of(0) == 100 and "SuperNodes [101] did not answer" in caplog.text
    with pytest.raises(LookupError, match="partition-id=1"):
        engine._node_of(1)
    engine._ask_unknown_nodes()  # the next round that samples client 1 asks again
    assert engine._node_of(1) == 101 and engine._node_of(0) == 100
    assert grid.asked == [[100, 101], [101]]
    assert grid.timeouts == [tiny_config.federation.round_timeout_s] * 2
