"""Selection diagnostics: the realised per-layer decrease on the server's probe set, paired with
the score the decision read; the probe set is never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from aslora.config import load_config
from aslora.diagnostics import realised_decrease
from aslora.experiment import prepare, run_experiment
from aslora.partition import set_apart
from aslora.protocol import GlobalState

REPO = Path(__file__).resolve().parents[1]


def _state(a: float, b: float) -> GlobalState:
    factors = {
        "l0": {"A": torch.full((1, 2), a), "B": torch.full((2, 1), b)},
        "l1": {"A": torch.full((1, 2), a), "B": torch.full((2, 1), b)},
    }
    return GlobalState(factors=factors, head={}, scaling={"l0": 1.0, "l1": 1.0})


def _loss(s: GlobalState) -> float:
    """A separable loss: each layer's (B A - 1)^2 summed, so each layer's share is known."""
    return sum(float(((f["B"] @ f["A"] - 1.0) ** 2).sum()) for f in s.factors.values())


def test_each_layer_is_credited_with_its_own_decrease() -> None:
    before = _state(0.5, 0.0)
    after = before.evolve(factors={**before.factors, "l1": {"A": before.factors["l1"]["A"], "B": torch.full((2, 1), 2.0)}})
    found = realised_decrease(_loss, before, after)
    assert set(found["realised"]) == {"l1"}  # l0 did not move: nothing to credit
    assert found["probe_loss"] == pytest.approx(8.0)
    assert found["realised"]["l1"] == pytest.approx(4.0)  # (0 - 1)^2 * 4 entries -> 0 at B A = 1
    assert found["realised_total"] == pytest.approx(4.0)


def test_a_probe_set_larger_than_the_data_is_refused() -> None:
    data = datasets.Dataset.from_dict({"x": list(range(10))})
    with pytest.raises(ValueError, match=r"data.probe_size=10 leaves no training data"):
        set_apart(data, 10, seed=0)
    rest, probe = set_apart(data, 3, seed=0)
    assert len(probe) == 3 and sorted(list(rest["x"]) + list(probe["x"])) == list(range(10))


def test_a_run_logs_predicted_and_realised_decrease_and_never_trains_on_the_probe(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path), "federation.rounds": 4, "data.probe_size": 300, "method": "aslora"}
    )
    setup = prepare(config)
    assert len(setup.probe) == 300
    assert sum(setup.sizes) == config.synthetic.train_examples - 300  # the clients' shards exclude it
    result = run_experiment(config)
    lines = [json.loads(line) for line in (result.directory / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        realised = line["diagnostics"]["realised"]
        assert set(realised) == set(line["mask"])  # every layer trains one factor each round
        assert all(isinstance(v, float) for v in realised.values())
    assert lines[0]["diagnostics"]["predicted"] == {}  # round 0 reads no score
    assert set(lines[2]["diagnostics"]["predicted"]) == set(lines[2]["mask"])
    assert lines[2]["diagnostics"]["predicted"] == lines[1]["selection"]["scores"]
    found = result.summary["selection_diagnostics"]
    assert found["pairs"] == 3 * len(lines[0]["mask"])  # rounds 1-3, every layer
    assert -1.0 <= found["spearman_predicted_realised"] <= 1.0
    assert set(found["share_of_rounds_on_a"]) == set(lines[0]["mask"])
    assert (result.directory / "calibration.png").is_file()


def test_without_a_probe_set_nothing_is_measured(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path), "federation.rounds": 2, "data.probe_size": 0, "method": "fedavg"}
    )
    result = run_experiment(config)
    assert all(r.diagnostics == {} for r in result.records)
    assert result.summary["selection_diagnostics"] == {}
    assert not (result.directory / "calibration.png").exists()


def test_the_lookahead_oracle_keeps_per_layer_the_trial_the_probe_prefers(tmp_path: Path) -> None:
    """On the synthetic task B alone cannot reach the outside layers' targets: after B has grown
    the oracle must pick A there in some round, and every pick is the better of its two trials."""
    config = load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path), "federation.rounds": 6, "method": "oracle"}
    )
    result = run_experiment(config)
    lines = [json.loads(line) for line in (result.directory / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for layer, (factor,) in line["mask"].items():
            tried = line["selection"]["lookahead"][layer]
            assert set(tried) == {"A", "B"} and tried[factor] == max(tried.values())
    assert any(line["mask"][layer] == ["A"] for line in lines for layer in line["mask"])
    # both trials train on the clients' data: each round is charged twice (RDP composes
    # sublinearly, so twice the steps cost about 1.2 times the epsilon here, not twice)
    single = run_experiment(config.with_overrides({"method": "rolora"})).summary["epsilon"]
    assert result.summary["epsilon"] > 1.1 * single


def test_the_oracle_needs_a_probe_set() -> None:
    with pytest.raises(ValueError, match=r"set data.probe_size"):
        load_config(REPO / "configs" / "synthetic.toml").with_overrides({"method": "oracle", "data.probe_size": 0})
