"""A client's end of the transport: what it holds between rounds, the start it builds from each
download, and the reply it sends. Both engines run it, so an in-process run and a Flower run move
the same bytes, and a download need only carry what changed since the client last synchronised."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from aslora.methods.base import Method
from aslora.protocol import ClientJob, ClientUpdate, GlobalState, pack, unpack

Trainer = Callable[[GlobalState, ClientJob], ClientUpdate]
PersonalEvaluation = Callable[[], dict[str, float]]  # the model just trained, on the client's held-out split


class StaleReplica(RuntimeError):
    """The job's download builds on a round this client never received (its replica was lost)."""


class Replica:
    """One client's copy of the server's tensors as it last received them, and the tensors it
    keeps for itself (a personalised method's, e.g. FedSA-LoRA's B and head), never sent."""

    def __init__(
        self,
        initial: Mapping[str, torch.Tensor],
        own: Mapping[str, torch.Tensor] | None = None,
        held: Mapping[str, torch.Tensor] | None = None,
        synced: int = -1,
    ) -> None:
        self.initial = dict(initial)  # every client builds the seeded initial state itself
        self.held = dict(held if held is not None else initial)
        self.own = dict(own or {})
        self.synced = synced  # the round whose download it last received; -1: none

    def start(self, job: ClientJob, method: Method) -> GlobalState:
        """The model this round trains from: the held tensors, updated by the download, and its own.

        A download builds on the round named by `job.base`; a replica that did not receive that
        one (a restarted SuperNode) refuses it rather than train from the wrong model, and the
        server then sends everything since the seeded initial (base -1)."""
        if job.base == -1:
            self.held = dict(self.initial)
        elif self.synced not in (job.base, job.round_index):  # this round's: a lookahead oracle's next trial
            raise StaleReplica(
                f"client {job.client_id} last received round {self.synced}'s download, but round "
                f"{job.round_index}'s builds on round {job.base}: its replica was lost; the server resends it whole"
            )
        self.held.update(method.restored(job.client_id, job.download, self.held))
        self.synced = job.round_index
        return GlobalState.from_tensors(self.held | self.own)

    def run(
        self, job: ClientJob, method: Method, train: Trainer, evaluate: PersonalEvaluation
    ) -> tuple[GlobalState, ClientUpdate]:
        """Train the job from this replica; keep what the method keeps; score it if asked. Returns
        the start it trained from (a SecAgg+ client checks its update against it) and the update."""
        start = self.start(job, method)
        update = train(start, job)
        self.own.update(method.kept(update))
        if job.evaluate:
            update.personal_metrics = evaluate()
        return start, update


def reply_header(update: ClientUpdate) -> dict[str, Any]:
    """Everything of an update but its tensors, as JSON-able values."""
    return {
        "client_id": update.client_id,
        "n_examples": update.n_examples,
        "examples_seen": update.examples_seen,
        "step_losses": update.step_losses,
        "step_lr_multipliers": update.step_lr_multipliers,
        "privacy_history": update.privacy_history,
        "stats": update.stats,
        "train_time_s": update.train_time_s,
        "personal_metrics": update.personal_metrics,
    }


def update_from_header(header: Mapping[str, Any], trained: GlobalState, stats: dict[str, Any]) -> ClientUpdate:
    """The inverse of `reply_header`, with the tensors and statistics as the server received them."""
    return ClientUpdate(
        client_id=int(header["client_id"]),
        n_examples=int(header["n_examples"]),
        factors=trained.factors,
        head=trained.head,
        examples_seen=int(header["examples_seen"]),
        step_losses=[None if loss is None else float(loss) for loss in header["step_losses"]],
        step_lr_multipliers=[float(m) for m in header["step_lr_multipliers"]],
        privacy_history=[tuple(h) for h in header["privacy_history"]],
        stats=stats,
        train_time_s=float(header["train_time_s"]),
        personal_metrics={k: float(v) for k, v in header["personal_metrics"].items()},
    )


def encode_reply(update: ClientUpdate, method: Method) -> bytes:
    """What a client sends back: the tensors its method uploads, the rest of its update as a header."""
    return pack(method.uploaded(update), reply_header(update))


def decode_reply(blob: bytes, method: Method, like: Mapping[str, torch.Tensor]) -> ClientUpdate:
    """The server's reading of a reply: the uploaded tensors brought back to the model's shapes."""
    tensors, header = unpack(blob)
    if header is None:
        raise ValueError("the reply carries no header: not an aslora client update")
    trained = GlobalState.from_tensors(method.restored(int(header["client_id"]), tensors, dict(like)))
    return update_from_header(header, trained, header["stats"])


def encode_job(job: ClientJob) -> bytes:
    """A job as it travels: its download's tensors, the rest as the header."""
    return pack(job.download, job.header())


def decode_job(blob: bytes) -> ClientJob:
    tensors, header = unpack(blob)
    if header is None:
        raise ValueError("the message carries no job header")
    return ClientJob.from_header(header, tensors)
