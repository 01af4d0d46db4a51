"""The same federation on Flower: a ServerApp running `server.py`, a ClientApp running `client.py`.

Nothing method-specific lives here. The server's `Federation` hands each
round's jobs to `FlowerEngine`, which sends every job to the SuperNode holding
that client's partition (its `partition-id`) as a Flower Message: the start
state as an ArrayRecord, the job and the resolved config as a ConfigRecord.
The ClientApp rebuilds the run's setup from that config (cached per process),
trains with `train_client`, and replies with the trained tensors (ArrayRecord)
and the rest of the update (ConfigRecord).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from aslora.client import ClientJob
from aslora.config import ExperimentConfig, load_config, parse_config
from aslora.experiment import Setup, prepare, run_experiment
from aslora.methods.base import ClientUpdate, GlobalState

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


def decode_job(record: ConfigRecord) -> tuple[ClientJob, ExperimentConfig]:
    raw = json.loads(str(record["job"]))
    raw["mask"] = {layer: tuple(fs) for layer, fs in raw["mask"].items()}
    return ClientJob(**raw), parse_config(json.loads(str(record["config"])))


def encode_update(update: ClientUpdate) -> RecordDict:
    tensors = update.tensors()
    meta = {
        "client_id": update.client_id,
        "n_examples": update.n_examples,
        "loss": update.loss,
        "examples_seen": update.examples_seen,
        "privacy_history": update.privacy_history,
        "stats": update.stats,
    }
    return RecordDict(
        {
            "update": ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in tensors.items()}),
            "meta": ConfigRecord({"json": json.dumps(meta)}),
        }
    )


def decode_update(content: RecordDict) -> ClientUpdate:
    meta = json.loads(str(content["meta"]["json"]))
    trained = GlobalState.from_tensors(content["update"].to_torch_state_dict())
    return ClientUpdate(
        client_id=int(meta["client_id"]),
        n_examples=int(meta["n_examples"]),
        factors=trained.factors,
        head=trained.head,
        loss=float(meta["loss"]),
        examples_seen=int(meta["examples_seen"]),
        privacy_history=[tuple(h) for h in meta["privacy_history"]],
        stats=meta["stats"],
    )


class FlowerEngine:
    """Carries a round's jobs to the SuperNodes and their updates back."""

    def __init__(self, grid: Grid, config: ExperimentConfig, wait_s: float = 120.0) -> None:
        self.grid = grid
        self.config = config
        self.wait_s = wait_s
        self._nodes: dict[int, int] = {}  # client (partition) id -> node id

    def _node_of(self, client: int) -> int:
        """Ask every SuperNode once which partition it holds."""
        if not self._nodes:
            deadline = time.monotonic() + self.wait_s
            nodes = list(self.grid.get_node_ids())
            while len(nodes) < self.config.data.num_clients and time.monotonic() < deadline:
                time.sleep(0.2)
                nodes = list(self.grid.get_node_ids())
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
        messages, sent = [], {}
        for state, job in zip(starts, jobs, strict=True):
            try:
                node = self._node_of(job.client_id)
            except LookupError as exc:
                results[job.client_id] = exc
                continue
            content = RecordDict({"state": encode_state(state), "job": encode_job(job, self.config)})
            messages.append(Message(content, dst_node_id=node, message_type="train"))
            sent[node] = job.client_id
        for reply in self.grid.send_and_receive(messages):
            client = sent[reply.metadata.src_node_id]
            if reply.has_error():
                results[client] = RuntimeError(f"client {client} failed: {reply.error.reason}")
            else:
                results[client] = decode_update(reply.content)
            done(client)
        return [results.get(j.client_id, TimeoutError(f"client {j.client_id} did not answer")) for j in jobs]


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


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One client round: the start state and the job in, the trained update out."""
    job, config = decode_job(msg.content["job"])
    partition = int(context.node_config["partition-id"])
    if partition != job.client_id:
        raise ValueError(f"this SuperNode holds partition {partition}, not client {job.client_id}")
    setup = _setup(config.model_dump_json())
    (result,) = setup.local_engine().train([decode_state(msg.content["state"])], [job], lambda _: None)
    if isinstance(result, Exception):
        raise result
    return Message(encode_update(result), reply_to=msg)


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
    config = parse_config(json.loads(path.read_text())) if path.suffix == ".json" else load_config(path)
    result = run_experiment(config, engine=lambda _setup: FlowerEngine(grid, config))
    log.info("results in %s", result.directory)
