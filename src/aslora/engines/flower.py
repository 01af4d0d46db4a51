"""The same federation on Flower: a ServerApp running `server.py`, a ClientApp running `client.py`.

Nothing method-specific lives here. The server's `Federation` hands each
round's jobs to `FlowerEngine`, which sends every job to the SuperNode holding
that client's partition (its `partition-id`) as a Flower Message: the job
with its download (what changed since the client last synchronised) as one
`pack`ed blob, beside the resolved config, in a ConfigRecord. The ClientApp
rebuilds the run's setup from that config (cached per process), builds its
start from its replica (kept in the SuperNode's `context.state` between
rounds), trains with `train_client`, and replies with what its method uploads,
packed the same way. The bytes recorded are the lengths of those blobs.

With federation.secure_aggregation the trained tensors and score statistics
are summed under Flower's SecAgg+ instead (`secagg.py`): the server receives
the weighted mean, and every accepted client's update carries that mean.
Each client checks its own update first, since the server no longer can.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from aslora import replica
from aslora.config import ExperimentConfig, load_config, parse_config
from aslora.engines import secagg
from aslora.engines.local import LocalEngine
from aslora.experiment import Setup, prepare, run_experiment
from aslora.methods.base import Method
from aslora.protocol import ClientJob, ClientUpdate, Delivery, GlobalState, pack, unpack
from aslora.replica import Replica, StaleReplica
from aslora.server import (
    NoAnswer,
    RejectedAfterTraining,
    expected_names,
    layout_problem,
    moved_too_far,
    value_problem,
)

log = logging.getLogger(__name__)
CONFIG_ENV = "ASLORA_FLOWER_CONFIG"  # path of the experiment TOML the ServerApp runs
REPLICA = "aslora-replica"  # where a SuperNode keeps its replica in its context.state
CONFIG_STATE = "aslora-config"  # and the run's config, which only a job with base -1 carries


def encode_job(job: ClientJob, config: ExperimentConfig) -> ConfigRecord:
    """A train message's content: the packed job (its download included), and the run's config
    where the client may lack it: when it has no replica yet (`job.base` -1). The config is the
    client's setup, not model traffic, so the bytes recorded leave it out."""
    fields: dict[str, Any] = {"job": replica.encode_job(job)}
    if job.base == -1:
        fields["config"] = config.model_dump_json()
    return ConfigRecord(fields)


def decode_job(record: Mapping[str, Any], context: Context) -> tuple[ClientJob, str]:
    """The job, and the run's config as JSON: the message's, kept in the SuperNode's state for the
    rounds that do not carry it."""
    job = replica.decode_job(bytes(record["job"]))
    if "config" in record:
        context.state[CONFIG_STATE] = ConfigRecord({"json": str(record["config"])})
    elif CONFIG_STATE not in context.state:
        raise StaleReplica(
            f"client {job.client_id}'s SuperNode holds no config for this run (it restarted): the server "
            "resends the config and everything since the seeded initial next round"
        )
    return job, str(context.state[CONFIG_STATE]["json"])


def encode_secure_update(
    update: ClientUpdate, start: GlobalState, job: ClientJob, setup: Setup, method: Method
) -> RecordDict:
    """The client's SecAgg+ answer: its checked tensors and statistics, masked, with its weight.

    An update with bad values goes in as zeros with weight 0 and its reason in the
    clear (it trained: the server charges its privacy cost); a malformed one, which
    only a bug makes, is raised, so the client leaves the round.
    """
    expected = expected_names(start, job.mask, setup.local.train_head)
    problem = layout_problem(update, start, job.mask, expected, job.statistics)
    if problem is not None:
        raise ValueError(f"client {update.client_id} built a malformed update: {problem}")
    tensors = method.uploaded(update)
    names = sorted(tensors)
    arrays = [tensors[name].double().numpy() for name in names]
    bound = setup.config.federation.secure_range
    # The server's norm check, run by the client itself: the server only sees the sum.
    problem = value_problem(update) or moved_too_far(update, start, setup.local, update.n_examples) or next(
        (
            f"{name} reaches {np.abs(a).max():.3g}, outside federation.secure_range={bound}; raise it"
            for name, a in zip(names, arrays, strict=True)
            if a.size and np.abs(a).max() > bound
        ),
        None,
    )
    layout, values = _flatten_stats(update.stats)
    arrays.append(secagg.ladder_encode(np.array(values, dtype=np.float64), bound))
    meta = replica.reply_header(update) | {
        "names": names,
        "dtypes": [str(tensors[name].dtype).removeprefix("torch.") for name in names],
        "stats": layout,
        "rejected": problem,
    }
    weight = 0 if problem else method.weight(update.n_examples)
    arrays = [np.zeros_like(a) for a in arrays] if problem else arrays
    return secagg.masked_reply(arrays, weight, {"meta": json.dumps(meta)})


def decode_secure_update(meta: Mapping[str, Any], mean: Sequence[np.ndarray]) -> ClientUpdate | Exception:
    """One client's update as the server sees it under SecAgg+: its own metadata, the round's mean."""
    if meta["rejected"]:
        return RejectedAfterTraining(f"{meta['rejected']} (found by the client before secure aggregation)")
    *arrays, stats = mean
    tensors = {
        name: torch.from_numpy(array).to(getattr(torch, dtype))
        for name, dtype, array in zip(meta["names"], meta["dtypes"], arrays, strict=True)
    }
    values = secagg.ladder_decode(stats).tolist()
    return replica.update_from_header(meta, GlobalState.from_tensors(tensors), _unflatten_stats(meta["stats"], values))


def _flatten_stats(stats: Mapping[str, Mapping[str, Mapping[str, float]]]) -> tuple[dict[str, Any], list[float]]:
    """Score statistics as a flat list, and the layout (layer -> factor -> names) that restores them."""
    layout = {layer: {f: sorted(v) for f, v in sorted(fs.items())} for layer, fs in stats.items()}
    values = [float(stats[layer][f][k]) for layer, fs in layout.items() for f, keys in fs.items() for k in keys]
    return layout, values


def _unflatten_stats(layout: Mapping[str, Mapping[str, list[str]]], values: list[float]) -> dict[str, Any]:
    flat = iter(values)
    return {layer: {f: {k: next(flat) for k in keys} for f, keys in fs.items()} for layer, fs in layout.items()}


class FlowerEngine:
    """Carries a round's jobs to the SuperNodes and their updates back (or their secure mean)."""

    def __init__(self, grid: Grid, context: Context, setup: Setup, wait_s: float = 120.0) -> None:
        self.grid = grid
        self.context = context
        self.config = setup.config
        self.wait_s = wait_s
        self.secure_aggregation = setup.config.federation.secure_aggregation
        self.method = setup.method()
        self.like = setup.initial.tensors()  # the model's shapes, for uploads cut below them
        self.max_weight = max(self.method.weight(n) for n in setup.sizes)  # SecAgg+ scales weights by it
        self._nodes: dict[int, int] = {}  # client (partition) id -> node id
        self._waited = False  # for the SuperNodes to connect: once, at the first job

    def _node_of(self, client: int) -> int:
        """The SuperNode that holds `client`'s partition, as the SuperNodes have said."""
        if client not in self._nodes:
            raise LookupError(f"no SuperNode holds partition {client}; start one with partition-id={client}")
        return self._nodes[client]

    def _connected_nodes(self) -> list[int]:
        """The SuperNodes connected now; the first time, after waiting up to wait_s for one per client."""
        nodes = list(self.grid.get_node_ids())
        if self._waited:
            return nodes
        self._waited = True
        deadline = time.monotonic() + self.wait_s
        wanted = self.config.data.num_clients
        while len(nodes) < wanted and time.monotonic() < deadline:
            time.sleep(0.2)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < wanted:  # e.g. `flwr run` on the local SuperLink, which simulates 2 by default
            log.warning(
                "only %d of %d SuperNodes connected after %.0f s: the clients without one are rejected every "
                "round. Start one SuperNode per client (flwr run: --federation-config 'num-supernodes=%d').",
                len(nodes), wanted, self.wait_s, wanted,
            )
        return nodes

    def _ask_unknown_nodes(self) -> None:
        """Ask each connected SuperNode not heard from yet which partition it holds, waiting as long
        as a round waits for its replies (federation.round_timeout_s): a ClientApp's first message
        starts it, which on a loaded machine took over 120 s. One that stays silent is asked again in
        the next round that samples a client without a SuperNode, not dropped for the rest of the run."""
        known = set(self._nodes.values())
        unknown = [n for n in self._connected_nodes() if n not in known]
        if not unknown:
            return
        queries = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in unknown]
        answered = set()
        timeout = self.config.federation.round_timeout_s
        for reply in self.grid.send_and_receive(queries, timeout=timeout):
            answered.add(reply.metadata.src_node_id)
            if reply.has_error():
                log.warning("SuperNode %d did not say which partition it holds: %s", reply.metadata.src_node_id,
                            reply.error.reason)
            else:
                self._nodes[int(reply.content["node"]["partition-id"])] = reply.metadata.src_node_id
        if silent := sorted(set(unknown) - answered):
            log.warning("SuperNodes %s did not answer within %.0f s; they are asked again in the next round "
                        "that samples a client without a SuperNode", silent, timeout)

    def train(self, jobs: Sequence[ClientJob], done: Callable[[int], None]) -> list[Delivery]:
        results: dict[int, ClientUpdate | Exception] = {}
        sent: dict[int, tuple[ConfigRecord, ClientJob]] = {}  # node id -> the message content, the job
        if any(job.client_id not in self._nodes for job in jobs):  # once a round: a silent node costs one wait
            self._ask_unknown_nodes()
        for job in jobs:
            try:
                sent[self._node_of(job.client_id)] = (encode_job(job, self.config), job)
            except LookupError as exc:
                results[job.client_id] = exc
        replies = self._train_secure(sent) if self.secure_aggregation else self._train_plain(sent)
        received: dict[int, int] = {}  # client -> bytes of its reply
        for node, (reply, size) in replies.items():
            client = sent[node][1].client_id
            results[client], received[client] = reply, size
            done(client)
        timeout = self.config.federation.round_timeout_s
        down = {job.client_id: len(bytes(record["job"])) for record, job in sent.values()}
        return [
            Delivery(
                results.get(j.client_id, NoAnswer(f"client {j.client_id} did not answer within federation.round_timeout_s={timeout:g}")),
                down.get(j.client_id, 0), received.get(j.client_id, 0),
            )
            for j in jobs
        ]

    def kept_by_clients(self) -> None:
        """The clients' own tensors stay on their SuperNodes: the server cannot see them."""

    def restore_kept(self, kept: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        raise RuntimeError("a Flower server cannot hand clients their own tensors: they live on the SuperNodes")

    def _train_plain(self, sent: Mapping[int, tuple[ConfigRecord, ClientJob]]) -> dict[int, tuple[ClientUpdate | Exception, int]]:
        messages = [
            Message(RecordDict({"job": record}), dst_node_id=node, message_type="train")
            for node, (record, _) in sent.items()
        ]
        received = list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s))
        # Pushing gave each message its id. A reply names the message it answers; its source is
        # not always the node: the SuperLink itself answers for a node it has lost.
        node_of = {m.metadata.message_id: node for m, node in zip(messages, sent, strict=True)}
        replies: dict[int, tuple[ClientUpdate | Exception, int]] = {}
        for reply in received:
            node = node_of[reply.metadata.reply_to_message_id]
            client = sent[node][1].client_id
            if reply.has_error() and reply.metadata.src_node_id != node:  # lost: it may have trained
                replies[node] = (NoAnswer(f"client {client}'s SuperNode was lost: {reply.error.reason}"), 0)
            elif reply.has_error():
                replies[node] = (RuntimeError(f"client {client} failed: {reply.error.reason}"), 0)
            else:
                blob = bytes(reply.content["reply"]["update"])
                replies[node] = (replica.decode_reply(blob, self.method, self.like), len(blob))
        return replies

    def _train_secure(self, sent: Mapping[int, tuple[ConfigRecord, ClientJob]]) -> dict[int, tuple[ClientUpdate | Exception, int]]:
        """One SecAgg+ round; a client that left it is reported with what the protocol knows. The
        bytes up are the masked vector's: its elements at the 8 bytes of SecAgg+'s integers."""
        if not sent:
            return {}
        instructions = {node: dict(record) for node, (record, _) in sent.items()}
        round_index = next(iter(sent.values()))[1].round_index
        outcome = secagg.secure_round(
            self.grid, self.context, instructions, round_index, self.max_weight, self.config.federation.secure_range,
            self.config.federation.round_timeout_s,
        )
        if outcome is None:
            # Those that answered had trained: every client sent the job is charged.
            halted = NoAnswer("secure aggregation halted: too few clients answered to unmask the sum")
            return dict.fromkeys(sent, (halted, 0))
        metrics, mean = outcome
        masked_bytes = 8 * sum(a.size for a in mean)
        replies: dict[int, tuple[ClientUpdate | Exception, int]] = {
            node: (NoAnswer(f"client {job.client_id} left the secure round (failed, or too late for federation.round_timeout_s)"), 0)
            for node, (_, job) in sent.items()
        }
        metas = {node: json.loads(str(m["meta"])) for node, m in metrics.items()}
        layouts = {json.dumps([m["names"], m["dtypes"]]) for m in metas.values() if not m["rejected"]}
        for node, meta in metas.items():
            if len(layouts) > 1:  # positions were summed: one layout or nothing is usable
                replies[node] = (RejectedAfterTraining("the clients' secure updates disagree on their layout"), masked_bytes)
            else:
                replies[node] = (decode_secure_update(meta, mean), masked_bytes)
        return replies


# The ClientApp -------------------------------------------------------------------------

client_app = ClientApp()


@cache
def _client(config_json: str) -> tuple[Setup, LocalEngine, Method]:
    """The run's setup on this client process (data, shards, model), the engine that trains and
    scores (its tokenised shards cached), and the method: built once per config, not per message."""
    setup = prepare(parse_config(json.loads(config_json)))
    return setup, setup.local_engine(), setup.method()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this SuperNode holds."""
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({"node": ConfigRecord({"partition-id": partition})}), reply_to=msg)


@client_app.train(mods=[secagg.client_mod])
def train(msg: Message, context: Context) -> Message:
    """One client round: the job and its download in; the start built from this SuperNode's replica
    (its `context.state`); the packed upload (or its masked form) out."""
    secure = secagg.is_secure(msg.content)
    job, config_json = decode_job(secagg.instruction(msg.content) if secure else msg.content["job"], context)
    partition = int(context.node_config["partition-id"])
    if partition != job.client_id:
        raise ValueError(f"this SuperNode holds partition {partition}, not client {job.client_id}")
    setup, engine, method = _client(config_json)
    own = _replica(context, setup)
    start, update = own.run(job, method, engine.train_from, lambda: engine.score_own(job.client_id))
    _keep_replica(context, own)
    if secure:
        return Message(encode_secure_update(update, start, job, setup, method), reply_to=msg)
    blob = replica.encode_reply(update, method)
    return Message(RecordDict({"reply": ConfigRecord({"update": blob})}), reply_to=msg)


def _replica(context: Context, setup: Setup) -> Replica:
    """This SuperNode's replica: kept in its `context.state` between rounds; at first the seeded initial."""
    if REPLICA not in context.state:
        return Replica(setup.initial.tensors())
    record = context.state[REPLICA]
    held, own = unpack(bytes(record["held"]))[0], unpack(bytes(record["own"]))[0]
    return Replica(setup.initial.tensors(), own, held, int(record["synced"]))


def _keep_replica(context: Context, own: Replica) -> None:
    context.state[REPLICA] = ConfigRecord(
        {"held": pack(own.held, {}), "own": pack(own.own, {}), "synced": own.synced}
    )


# The ServerApp -------------------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment named by run_config 'config' (or $ASLORA_FLOWER_CONFIG) over Flower.

    A .toml path is an experiment file; a .json path a resolved config (what
    `aslora run --engine flower` writes, overrides included).
    """
    path = context.run_config.get("config") or os.environ.get(CONFIG_ENV)
    if not path:
        raise ValueError(f"name the experiment: run config 'config' or ${CONFIG_ENV}, a TOML or JSON file")
    path = Path(str(path))
    if path.suffix == ".json":  # a run directory's resolved config
        config = parse_config(json.loads(path.read_text()))
    else:
        config = load_config(path)
        config = config.for_method(config.method)
    result = run_experiment(config, engine=lambda setup: FlowerEngine(grid, context, setup))
    log.info("results in %s", result.directory)
