"""The same federation on Flower: a ServerApp running `server.py`, a ClientApp running `client.py`.

Nothing method-specific lives here. The server's `Federation` hands each
round's jobs to `FlowerEngine`, which sends every job to the SuperNode holding
that client's partition (its `partition-id`) as a Flower Message: the start
state as an ArrayRecord, the job and the resolved config as a ConfigRecord.
The ClientApp rebuilds the run's setup from that config (cached per process),
trains with `train_client`, and replies with the trained tensors (ArrayRecord)
and the rest of the update (ConfigRecord).

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
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from aslora.config import ExperimentConfig, load_config, parse_config
from aslora.engines import secagg
from aslora.experiment import Setup, prepare, run_experiment
from aslora.protocol import ClientJob, ClientUpdate, GlobalState
from aslora.server import (
    NoAnswer,
    RejectedAfterTraining,
    layout_problem,
    moved_too_far,
    value_problem,
)

log = logging.getLogger(__name__)
CONFIG_ENV = "ASLORA_FLOWER_CONFIG"  # path of the experiment TOML the ServerApp runs


def encode_state(state: GlobalState) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in state.tensors().items()})


def decode_state(record: ArrayRecord) -> GlobalState:
    return GlobalState.from_tensors(record.to_torch_state_dict())


def encode_job(job: ClientJob, config: ExperimentConfig) -> ConfigRecord:
    return ConfigRecord(
        {
            "config": config.model_dump_json(),
            "job": json.dumps(
                {
                    "client_id": job.client_id,
                    "round_index": job.round_index,
                    "seed": job.seed,
                    "mask": {layer: list(fs) for layer, fs in job.mask.items()},
                    "statistics": job.statistics,
                    "rank": job.rank,
                    "fail": job.fail,
                }
            ),
        }
    )


def decode_job(record: Mapping[str, Any]) -> tuple[ClientJob, ExperimentConfig]:
    raw = json.loads(str(record["job"]))
    raw["mask"] = {layer: tuple(fs) for layer, fs in raw["mask"].items()}
    return ClientJob(**raw), parse_config(json.loads(str(record["config"])))


def _meta(update: ClientUpdate) -> dict[str, Any]:
    """What an update says about itself, besides its tensors."""
    return {
        "client_id": update.client_id,
        "n_examples": update.n_examples,
        "loss": update.loss,
        "examples_seen": update.examples_seen,
        "privacy_history": update.privacy_history,
        "train_time_s": update.train_time_s,
    }


def _from_meta(meta: Mapping[str, Any], trained: GlobalState, stats: dict[str, Any]) -> ClientUpdate:
    return ClientUpdate(
        client_id=int(meta["client_id"]),
        n_examples=int(meta["n_examples"]),
        factors=trained.factors,
        head=trained.head,
        loss=float(meta["loss"]),
        examples_seen=int(meta["examples_seen"]),
        privacy_history=[tuple(h) for h in meta["privacy_history"]],
        stats=stats,
        train_time_s=float(meta["train_time_s"]),
    )


def encode_update(update: ClientUpdate) -> RecordDict:
    tensors = update.tensors()
    return RecordDict(
        {
            "update": ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in tensors.items()}),
            "meta": ConfigRecord({"json": json.dumps(_meta(update) | {"stats": update.stats})}),
        }
    )


def decode_update(content: RecordDict) -> ClientUpdate:
    meta = json.loads(str(content["meta"]["json"]))
    return _from_meta(meta, GlobalState.from_tensors(content["update"].to_torch_state_dict()), meta["stats"])


def encode_secure_update(
    update: ClientUpdate, start: GlobalState, job: ClientJob, setup: Setup
) -> RecordDict:
    """The client's SecAgg+ answer: its checked tensors and statistics, masked, with its weight.

    An update with bad values goes in as zeros with weight 0 and its reason in the
    clear (it trained: the server charges its privacy cost); a malformed one, which
    only a bug makes, is raised, so the client leaves the round.
    """
    problem = layout_problem(update, start, job.mask, setup.local.train_head, job.statistics)
    if problem is not None:
        raise ValueError(f"client {update.client_id} built a malformed update: {problem}")
    method = setup.method()
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
    meta = _meta(update) | {
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
    return _from_meta(meta, GlobalState.from_tensors(tensors), _unflatten_stats(meta["stats"], values))


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
        method = setup.method()
        self.max_weight = max(method.weight(n) for n in setup.sizes)  # SecAgg+ scales weights by it
        self._nodes: dict[int, int] = {}  # client (partition) id -> node id

    def _node_of(self, client: int) -> int:
        """Ask every SuperNode once which partition it holds."""
        if not self._nodes:
            deadline = time.monotonic() + self.wait_s
            nodes = list(self.grid.get_node_ids())
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
            queries = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
            for reply in self.grid.send_and_receive(queries, timeout=self.wait_s):
                if not reply.has_error():
                    self._nodes[int(reply.content["node"]["partition-id"])] = reply.metadata.src_node_id
        if client not in self._nodes:
            raise LookupError(f"no SuperNode holds partition {client}; start one with partition-id={client}")
        return self._nodes[client]

    def train(
        self, starts: Sequence[GlobalState], jobs: Sequence[ClientJob], done: Callable[[int], None]
    ) -> list[ClientUpdate | Exception]:
        results: dict[int, ClientUpdate | Exception] = {}
        sent: dict[int, tuple[GlobalState, ClientJob]] = {}  # node id -> what it trains
        for state, job in zip(starts, jobs, strict=True):
            try:
                sent[self._node_of(job.client_id)] = (state, job)
            except LookupError as exc:
                results[job.client_id] = exc
        replies = self._train_secure(sent) if self.secure_aggregation else self._train_plain(sent)
        for node, reply in replies.items():
            results[sent[node][1].client_id] = reply
            done(sent[node][1].client_id)
        timeout = self.config.federation.round_timeout_s
        return [
            results.get(j.client_id, NoAnswer(f"client {j.client_id} did not answer within federation.round_timeout_s={timeout:g}"))
            for j in jobs
        ]

    def _train_plain(self, sent: Mapping[int, tuple[GlobalState, ClientJob]]) -> dict[int, ClientUpdate | Exception]:
        messages = [
            Message(
                RecordDict({"state": encode_state(state), "job": encode_job(job, self.config)}),
                dst_node_id=node,
                message_type="train",
            )
            for node, (state, job) in sent.items()
        ]
        received = list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout_s))
        # Pushing gave each message its id. A reply names the message it answers; its source is
        # not always the node: the SuperLink itself answers for a node it has lost.
        node_of = {m.metadata.message_id: node for m, node in zip(messages, sent, strict=True)}
        replies: dict[int, ClientUpdate | Exception] = {}
        for reply in received:
            node = node_of[reply.metadata.reply_to_message_id]
            client = sent[node][1].client_id
            if reply.has_error() and reply.metadata.src_node_id != node:  # lost: it may have trained
                replies[node] = NoAnswer(f"client {client}'s SuperNode was lost: {reply.error.reason}")
            elif reply.has_error():
                replies[node] = RuntimeError(f"client {client} failed: {reply.error.reason}")
            else:
                replies[node] = decode_update(reply.content)
        return replies

    def _train_secure(self, sent: Mapping[int, tuple[GlobalState, ClientJob]]) -> dict[int, ClientUpdate | Exception]:
        """One SecAgg+ round; a client that left it is reported with what the protocol knows."""
        if not sent:
            return {}
        instructions = {
            node: {"state": save_tensors(dict(encode_state(state).to_torch_state_dict())), **encode_job(job, self.config)}
            for node, (state, job) in sent.items()
        }
        round_index = next(iter(sent.values()))[1].round_index
        outcome = secagg.secure_round(
            self.grid, self.context, instructions, round_index, self.max_weight, self.config.federation.secure_range,
            self.config.federation.round_timeout_s,
        )
        if outcome is None:
            # Those that answered had trained: every client sent the job is charged.
            halted = NoAnswer("secure aggregation halted: too few clients answered to unmask the sum")
            return dict.fromkeys(sent, halted)
        metrics, mean = outcome
        replies: dict[int, ClientUpdate | Exception] = {
            node: NoAnswer(f"client {job.client_id} left the secure round (failed, or too late for federation.round_timeout_s)")
            for node, (_, job) in sent.items()
        }
        metas = {node: json.loads(str(m["meta"])) for node, m in metrics.items()}
        layouts = {json.dumps([m["names"], m["dtypes"]]) for m in metas.values() if not m["rejected"]}
        for node, meta in metas.items():
            if len(layouts) > 1:  # positions were summed: one layout or nothing is usable
                replies[node] = RejectedAfterTraining("the clients' secure updates disagree on their layout")
            else:
                replies[node] = decode_secure_update(meta, mean)
        return replies


# The ClientApp -------------------------------------------------------------------------

client_app = ClientApp()


@cache
def _setup(config_json: str) -> Setup:
    """The run's setup on this client process (data, shards, model), built once per config."""
    return prepare(parse_config(json.loads(config_json)))


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this SuperNode holds."""
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({"node": ConfigRecord({"partition-id": partition})}), reply_to=msg)


@client_app.train(mods=[secagg.client_mod])
def train(msg: Message, context: Context) -> Message:
    """One client round: the start state and the job in, the trained update (or its masked form) out."""
    secure = secagg.is_secure(msg.content)
    if secure:
        fields = secagg.instruction(msg.content)
        job, config = decode_job(fields)
        start = GlobalState.from_tensors(load_tensors(bytes(fields["state"])))
    else:
        job, config = decode_job(msg.content["job"])
        start = decode_state(msg.content["state"])
    partition = int(context.node_config["partition-id"])
    if partition != job.client_id:
        raise ValueError(f"this SuperNode holds partition {partition}, not client {job.client_id}")
    setup = _setup(config.model_dump_json())
    (result,) = setup.local_engine().train([start], [job], lambda _: None)
    if isinstance(result, Exception):
        raise result
    reply = encode_secure_update(result, start, job, setup) if secure else encode_update(result)
    return Message(reply, reply_to=msg)


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
