"""A federation's checkpoint after every round: tensors in safetensors, the rest in JSON.

Written atomically: the tensors go to a new file named by the round, then the
JSON that names it replaces the previous JSON in one `os.replace` (the commit
point), then older tensor files are removed. Loading reads only safetensors
and JSON, never pickles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aslora.protocol import GlobalState

MANIFEST = "checkpoint.json"


@dataclass
class Checkpoint:
    """Everything a run needs to continue after `rounds_done` rounds."""

    rounds_done: int
    state: GlobalState
    server: dict[str, Any]  # the federation's bookkeeping (privacy histories, versions)
    initial_metrics: dict[str, float]
    config: dict[str, Any] | None = None  # the resolved config it ran with (None: an older checkpoint)
    wall_s: float = 0.0  # wall time of every segment of the run so far (resumes add up)
    privacy: dict[str, Any] | None = None  # the privacy plan: sigma per segment, planned steps and epsilon
    # What simulated clients keep for themselves (a personalised method's tensors), by client.
    clients: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and how to go on."""


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure with tensors moved out to `tensors` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[_split(k, f"{path}.k{i}", tensors), _split(v, f"{path}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, list | tuple):
        return [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    tensors: dict[str, torch.Tensor] = {}
    state = checkpoint.state
    body = {
        "rounds_done": checkpoint.rounds_done,
        "state": _split(
            {"tensors": state.tensors(), "scaling": state.scaling, "memory": state.memory}, "state", tensors
        ),
        "server": _split(checkpoint.server, "server", tensors),  # a server optimiser's moments are tensors
        "initial_metrics": checkpoint.initial_metrics,
        "config": checkpoint.config,
        "wall_s": checkpoint.wall_s,
        "privacy": checkpoint.privacy,
        "clients": _split([[c, kept] for c, kept in checkpoint.clients.items()], "clients", tensors),
    }
    tensor_file = f"checkpoint-{checkpoint.rounds_done:05d}.safetensors"
    save_file(tensors, str(directory / tensor_file))
    body["tensor_file"] = tensor_file
    partial = directory / (MANIFEST + ".partial")
    partial.write_text(json.dumps(body))
    os.replace(partial, directory / MANIFEST)
    for old in directory.glob("checkpoint-*.safetensors"):
        if old.name != tensor_file:
            old.unlink()


def remove_debris(directory: Path) -> None:
    """What a save killed midway leaves: a manifest never committed, tensors it never named."""
    manifest = directory / MANIFEST
    named = json.loads(manifest.read_text()).get("tensor_file") if manifest.is_file() else None
    (directory / (MANIFEST + ".partial")).unlink(missing_ok=True)
    for tensors in directory.glob("checkpoint-*.safetensors"):
        if tensors.name != named:
            tensors.unlink()


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The last committed checkpoint in `directory`, or None if there is none."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    try:
        body = json.loads(manifest.read_text())
        tensors = load_file(str(directory / body["tensor_file"]))
        saved = _join(body["state"], tensors)
        flat = GlobalState.from_tensors(saved["tensors"])
        state = flat.evolve(scaling=saved["scaling"], memory=saved["memory"])
        clients = {int(c): kept for c, kept in _join(body.get("clients", []), tensors)}
        return Checkpoint(
            body["rounds_done"], state, _join(body["server"], tensors), body["initial_metrics"], body.get("config"),
            body.get("wall_s", 0.0), body.get("privacy"), clients,
        )
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"{manifest} (or the tensor file it names) cannot be read: {type(exc).__name__}: {exc}. The run "
            f"cannot continue from it; start it again in a new directory (metrics.jsonl keeps the rounds done)"
        ) from None
