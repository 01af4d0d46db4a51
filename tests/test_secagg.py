"""Secure aggregation's pieces that need no Flower run: encodings, client-side checks, refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from aslora.checkpoint import load_checkpoint
from aslora.config import ConfigError, ExperimentConfig, load_config
from aslora.engines.flower import decode_secure_update, encode_secure_update
from aslora.engines.local import LocalEngine
from aslora.engines.secagg import ladder_decode, ladder_encode
from aslora.experiment import prepare, run_experiment
from aslora.protocol import ClientJob, GlobalState
from aslora.server import RejectedAfterTraining

REPO = Path(__file__).resolve().parents[1]


def test_ladder_mean_decodes_to_the_mean_of_values_across_magnitudes() -> None:
    """Statistics from 1e-9 to 1e4, some beyond the range at the finer scales for one client only."""
    values = [np.array([1.7e-4, 0.43, 18.2, 3e3, 1e-9, -2.5]), np.array([2e-4, 0.2, 5.0, 7e3, 2e-9, 1.0])]
    weights = [0.25, 0.75]
    encoded = sum(w * ladder_encode(v, 16.0) for w, v in zip(weights, values, strict=True))
    expected = sum(w * v for w, v in zip(weights, values, strict=True))
    np.testing.assert_allclose(ladder_decode(encoded), expected, rtol=1e-12)


def test_ladder_gives_nan_where_every_scale_overflows() -> None:
    decoded = ladder_decode(ladder_encode(np.array([1.0, 1e12]), 16.0))
    assert decoded[0] == 1.0 and np.isnan(decoded[1])


def _synthetic(tmp_path: Path, **overrides: object) -> ExperimentConfig:
    return load_config(REPO / "configs" / "synthetic.toml").with_overrides(
        {"output_dir": str(tmp_path), "method": "aslora", "federation.rounds": 1, **overrides}
    )


def test_the_local_engine_refuses_secure_aggregation_before_training(tmp_path: Path) -> None:
    config = _synthetic(tmp_path, **{"federation.secure_aggregation": True})
    with pytest.raises(ConfigError, match="--engine flower"):
        run_experiment(config)
    assert not any(tmp_path.iterdir())  # no run directory half-written


@pytest.mark.parametrize(
    ("dp", "reason"),
    [(True, "beyond the .* that its DP-SGD round allows"), (False, "outside federation.secure_range=4.0")],
)
def test_a_client_rejects_its_own_bad_update_and_is_charged(tmp_path: Path, dp: bool, reason: str) -> None:
    """Under SecAgg+ the server cannot check values: the client does (the DP norm bound, then the
    range), sends zeros with weight 0, and names the problem in the clear; the server turns that
    into a charged rejection."""
    overrides = {"federation.secure_aggregation": True, "federation.secure_range": 4.0, "privacy.enabled": dp}
    setup = prepare(_synthetic(tmp_path, **overrides))
    method = setup.method()
    view = setup.view
    start = GlobalState(factors=view.get_factors(), head=view.get_head(), scaling={})
    job = ClientJob(0, 0, 7, method.plan(0, start), statistics=method.statistics)
    (delivery,) = setup.local_engine().train([job], lambda _: None)
    update = delivery.result
    good = compat.recorddict_to_fitres(encode_secure_update(update, start, job, setup, method), keep_input=True)
    assert good.num_examples == setup.sizes[0] and not json.loads(good.metrics["meta"])["rejected"]

    layer, factors = next(iter(update.factors.items()))
    factor = next(iter(factors))
    update.factors[layer][factor] = torch.full_like(factors[factor], 9.0)
    bad = compat.recorddict_to_fitres(encode_secure_update(update, start, job, setup, method), keep_input=True)
    meta = json.loads(bad.metrics["meta"])
    assert bad.num_examples == 0
    assert all(not np.any(a) for a in parameters_to_ndarrays(bad.parameters))
    assert re.search(reason, meta["rejected"])
    assert isinstance(decode_secure_update(meta, []), RejectedAfterTraining)


class _FirstClientRejects(LocalEngine):
    """The local engine, but the round's first client reports its update unusable after training."""

    def train(self, jobs, done):  # type: ignore[no-untyped-def]
        deliveries = super().train(jobs, done)
        deliveries[0].result = RejectedAfterTraining("its values are out of range")
        return deliveries


def test_a_client_rejected_after_training_is_charged_its_round(tmp_path: Path) -> None:
    config = _synthetic(tmp_path)
    result = run_experiment(config, engine=lambda s: s.local_engine(_FirstClientRejects))
    (record,) = result.records
    assert record.rejected == record.clients[:1]
    histories = dict(load_checkpoint(result.directory).server["histories"])
    assert all(len(histories[c]) == 1 for c in record.clients)  # all trained, all charged
