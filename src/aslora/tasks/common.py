"""What every task shares: the interface the federation sees, where local data lives, the error
when it is not there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import datasets
import torch
from peft import PeftModel
from torch.utils.data import TensorDataset

from aslora.config import ExperimentConfig


class Task(Protocol):
    """A task as the federation uses it: raw splits, encoding, model, loss and metrics.

    `encode` gives tensors whose last one is per-example (its length is the
    batch size); `encode_train` is what clients train on, one row per example
    since a row is DP-SGD's unit of privacy (most tasks: `encode` itself);
    `evaluate` returns metrics with `metric` among them.
    `extra_evals` are further evaluation splits, reported with their name as a
    prefix (MNLI's mismatched dev set: 'mm_accuracy').
    """

    name: str
    metric: str
    train: datasets.Dataset
    eval: datasets.Dataset
    extra_evals: dict[str, datasets.Dataset]

    def encode(self, split: datasets.Dataset) -> TensorDataset: ...

    def encode_train(self, split: datasets.Dataset) -> TensorDataset: ...

    def build_model(self, config: ExperimentConfig) -> PeftModel: ...

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, data: TensorDataset, batch_size: int) -> dict[str, float]: ...


class DataNotFoundError(FileNotFoundError):
    """The data set is neither in the local data folder nor reachable on the hub."""


def data_root(config: ExperimentConfig) -> Path | None:
    """The local data folder: data.dir, else $ASLORA_DATA_DIR, else none (use the hub)."""
    root = config.data.dir or os.environ.get("ASLORA_DATA_DIR") or None
    return Path(root) if root else None
