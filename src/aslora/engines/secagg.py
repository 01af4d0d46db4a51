"""One round of Flower's SecAgg+ protocol: the server learns only the weighted mean.

Flower 1.42 ships SecAgg+ only for its legacy strategy API: the server side is
`SecAggPlusWorkflow` (which asks a `Strategy` for fit instructions and hands
it the unmasked sum), the client side `secaggplus_mod` (which masks the
`FitRes` a ClientApp returns). This module adapts both to a single round
whose instructions are already made, so the protocol, its cryptography and
its drop-out recovery stay Flower's own. What travels in the clear: each
client's instruction (the model it starts from) and its metrics; the arrays
it trained are summed under masks, weighted by the integer weight it reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

# 2^30 fixed-point levels over [-range, range]: Flower rounds to int32, so this is
# its finest grid; sums of up to 2^10 clients stay below the 2^40 modulus.
QUANTIZATION_LEVELS = 2**30
MODULUS = 2**40
INSTRUCTION = "fitins.config"  # where a SecAgg+ round's instruction sits in a message
# Score statistics span many orders of magnitude (1e-5 to 1e3), too many for one
# fixed-point grid; each is sent at every scale of this ladder, finest first.
LADDER = (2.0**10, 1.0, 2.0**-10, 2.0**-20)


def ladder_encode(values: np.ndarray, value_range: float) -> np.ndarray:
    """`values` at every scale of LADDER, clipped to the range, each with a flag where it overflowed.

    Linear in `values` (the flags aside), so the secure mean of encodings decodes
    to the mean of the values at the finest scale where no client overflowed.
    """
    scaled = np.outer(LADDER, values)
    overflow = (np.abs(scaled) > value_range).astype(np.float64)
    return np.concatenate([np.clip(scaled, -value_range, value_range), overflow])


def ladder_decode(mean: np.ndarray) -> np.ndarray:
    """The values back from the mean of their encodings; NaN where every scale overflowed."""
    rungs = len(LADDER)
    scaled, overflow = mean[:rungs], mean[rungs:]
    values = np.full(mean.shape[1], np.nan)
    for rung in reversed(range(rungs)):  # coarse to fine: the finest clean scale wins
        clean = overflow[rung] < 1e-6  # a flag's mean is at least one client's weight share
        values[clean] = scaled[rung][clean] / LADDER[rung]
    return values


def client_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client mod for the messages of a SecAgg+ round; others pass through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure(content: RecordDict) -> bool:
    """Whether a train message is the masked-vector stage of a SecAgg+ round."""
    return INSTRUCTION in content.config_records


def instruction(content: RecordDict) -> Mapping[str, Any]:
    """The instruction a client received in a SecAgg+ round."""
    return compat.recorddict_to_fitins(content, keep_input=True).config


def masked_reply(arrays: list[np.ndarray], weight: int, metrics: dict[str, str]) -> RecordDict:
    """A client's answer: `arrays` go into the secure sum with `weight`; `metrics` travel in the clear."""
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=True)


class _OneRound:
    """The two Strategy calls SecAggPlusWorkflow makes, for one round of ready instructions."""

    def __init__(self, grid: Grid, run_id: int, instructions: Mapping[int, dict[str, Any]]) -> None:
        self.grid = grid
        self.run_id = run_id
        self.instructions = instructions
        self.results: list[tuple[int, FitRes]] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        empty = Parameters(tensors=[], tensor_type="")
        return [
            (GridClientProxy(node, self.grid, self.run_id), FitIns(empty, dict(config)))
            for node, config in self.instructions.items()
        ]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        self.results = [(proxy.node_id, fitres) for proxy, fitres in results]
        return None, {}


def secure_round(
    grid: Grid,
    context: Context,
    instructions: Mapping[int, dict[str, Any]],
    round_index: int,
    max_weight: int,
    value_range: float,
    timeout_s: float,
) -> tuple[dict[int, dict[str, Any]], list[np.ndarray]] | None:
    """Run SecAgg+ over `instructions` (node id -> instruction).

    Returns each surviving node's metrics and the weighted mean of their arrays,
    or None when the protocol halted (too few clients left to unmask the sum).
    """
    strategy = _OneRound(grid, context.run_id, instructions)
    legacy = LegacyContext(context, strategy=strategy)  # type: ignore[arg-type]
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled client holds shares of every other's secrets
        reconstruction_threshold=0.5,  # half of them must survive to unmask the sum
        max_weight=float(max_weight),
        clipping_range=value_range,
        quantization_range=QUANTIZATION_LEVELS,
        modulus_range=MODULUS,
        timeout=timeout_s,  # per protocol stage: a node lost mid-round cannot hold the others forever
    )
    workflow(grid, legacy)
    if not strategy.results:
        return None
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    return {node: dict(fitres.metrics) for node, fitres in strategy.results}, mean
