"""In-process simulation: every client trains in turn on one shared model.

Each job and each reply still goes through the transport's serialisation
(`replica.py`) and each client keeps its own replica, as over Flower, so the
bytes recorded are those a deployment would send and a client starts from
exactly what it was sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import datasets
import torch
from torch.utils.data import TensorDataset

from aslora.adapters import LoraView
from aslora.client import LocalSettings, train_client
from aslora.methods.base import Method
from aslora.protocol import ClientJob, ClientUpdate, Delivery, GlobalState
from aslora.replica import Replica, decode_job, decode_reply, encode_job, encode_reply
from aslora.tasks.common import Task

log = logging.getLogger(__name__)


class LocalEngine:
    """Runs clients sequentially in this process; a failing client is reported, not fatal."""

    secure_aggregation = False

    def __init__(
        self,
        view: LoraView,
        task: Task,
        shards: Sequence[datasets.Dataset],
        held_out: Sequence[datasets.Dataset],
        settings: LocalSettings,
        method: Method,
        initial: Mapping[str, torch.Tensor],
        eval_batch_size: int,
    ) -> None:
        self.view = view
        self.task = task
        self.shards = list(shards)
        self.held_out = list(held_out)
        self.settings = settings
        self.method = method
        self.initial = dict(initial)
        self.eval_batch_size = eval_batch_size
        self.replicas = {c: Replica(self.initial) for c in range(len(self.shards))}
        self._encoded: dict[int, TensorDataset] = {}
        self._held_out_encoded: dict[int, TensorDataset] = {}

    def client_data(self, client: int) -> TensorDataset:
        """The client's shard, tokenised on first use."""
        if client not in self._encoded:
            self._encoded[client] = self.task.encode_train(self.shards[client])
        return self._encoded[client]

    def train(self, jobs: Sequence[ClientJob], done: Callable[[int], None]) -> list[Delivery]:
        deliveries = []
        for job in jobs:
            sent = encode_job(job)
            try:
                deliveries.append(self._round_trip(sent))
            except Exception as exc:  # one client's failure must not end the round
                log.exception("client %d failed in round %d", job.client_id, job.round_index)
                deliveries.append(Delivery(exc, len(sent)))
            done(job.client_id)
        return deliveries

    def _round_trip(self, sent: bytes) -> Delivery:
        job = decode_job(sent)
        _, update = self.replicas[job.client_id].run(job, self.method, self.train_from, lambda: self.score_own(job.client_id))
        reply = encode_reply(update, self.method)
        return Delivery(decode_reply(reply, self.method, self.initial), len(sent), len(reply))

    def train_from(self, start: GlobalState, job: ClientJob) -> ClientUpdate:
        """One client's round from the start its replica built."""
        return train_client(self.view, self.client_data(job.client_id), start, job, self.settings, self.task.loss)

    def score_own(self, client: int) -> dict[str, float]:
        """The model the client just trained, on its held-out split (a personalised method's figure)."""
        if client not in self._held_out_encoded:
            self._held_out_encoded[client] = self.task.encode(self.held_out[client])
        data = self._held_out_encoded[client]
        return self.task.evaluate(self.view.model, data, self.eval_batch_size) | {"n": float(len(data))}

    def kept_by_clients(self) -> dict[int, dict[str, torch.Tensor]] | None:
        """What each simulated client keeps for itself (a personalised method's evaluation view and
        the checkpoint, standing in for the clients' own disks)."""
        return {c: dict(r.own) for c, r in self.replicas.items()}

    def restore_kept(self, kept: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Resume: the clients' kept tensors as checkpointed; their server tensors restart at the
        seeded initial, and the server resends everything that changed since."""
        self.replicas = {c: Replica(self.initial, kept.get(c)) for c in range(len(self.shards))}
