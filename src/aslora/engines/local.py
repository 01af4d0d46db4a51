"""In-process simulation: every client trains in turn on one shared model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import datasets
from torch.utils.data import TensorDataset

from aslora.adapters import LoraView
from aslora.client import LocalSettings, LossFn, train_client
from aslora.protocol import ClientJob, ClientUpdate, GlobalState

log = logging.getLogger(__name__)


class LocalEngine:
    """Runs clients sequentially in this process; a failing client is reported, not fatal."""

    secure_aggregation = False

    def __init__(
        self,
        view: LoraView,
        shards: Sequence[datasets.Dataset],
        encode: Callable[[datasets.Dataset], TensorDataset],
        settings: LocalSettings,
        loss_fn: LossFn,
    ) -> None:
        self.view = view
        self.shards = list(shards)
        self.encode = encode
        self.settings = settings
        self.loss_fn = loss_fn
        self._encoded: dict[int, TensorDataset] = {}

    def client_data(self, client: int) -> TensorDataset:
        """The client's shard, tokenised on first use."""
        if client not in self._encoded:
            self._encoded[client] = self.encode(self.shards[client])
        return self._encoded[client]

    def train(
        self, starts: Sequence[GlobalState], jobs: Sequence[ClientJob], done: Callable[[int], None]
    ) -> list[ClientUpdate | Exception]:
        results: list[ClientUpdate | Exception] = []
        for state, job in zip(starts, jobs, strict=True):
            try:
                data = self.client_data(job.client_id)
                results.append(train_client(self.view, data, state, job, self.settings, self.loss_fn))
            except Exception as exc:  # one client's failure must not end the round
                log.exception("client %d failed in round %d", job.client_id, job.round_index)
                results.append(exc)
            done(job.client_id)
        return results
