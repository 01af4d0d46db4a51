"""What every task shares: the interface the federation sees, where local data lives, the error
when it is not there."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

import datasets
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch.utils.data import TensorDataset

from aslora.config import ExperimentConfig, LoraSettings


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


class DataFormatError(ValueError):
    """A data file that cannot be parsed; the message names the file, the line where known, and the fix."""


def data_root(config: ExperimentConfig) -> Path | None:
    """The local data folder: data.dir, else $ASLORA_DATA_DIR, else none (use the hub)."""
    root = config.data.dir or os.environ.get("ASLORA_DATA_DIR") or None
    return Path(root) if root else None


def with_lora(
    base: torch.nn.Module,
    lora: LoraSettings,
    dropout: float | None,
    task_type: TaskType | None,
    head_hint: str,
    target_hint: str = "",
) -> PeftModel:
    """`base` with LoRA adapters on lora.target_modules and lora.head_modules trained fully.

    `dropout` (model.dropout), where given, replaces every dropout rate of
    `base` before PEFT adds its own (lora.dropout).

    A name the model does not have fails before training, with `head_hint` or
    the model's own linear layers (and `target_hint`) saying what to write.
    """
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in lora.head_modules if m not in present]
    if missing:
        raise ValueError(f"lora.head_modules names {missing}, which {type(base).__name__} does not have; {head_hint}")
    _check_layers(base, lora)
    if lora.head_init == "zero":
        _zero_output_layer(base, lora.head_modules)
    if dropout is not None:
        _set_dropout(base, dropout)
    config = LoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=list(lora.layers) or None,
        modules_to_save=list(lora.head_modules) or None,
    )
    try:
        return get_peft_model(base, config)
    except ValueError as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"lora.target_modules={list(lora.target_modules)}: {exc} The linear layers of "
            f"{type(base).__name__} here are named {linear}{'; ' + target_hint if target_hint else ''}"
        ) from None


def _check_layers(base: torch.nn.Module, lora: LoraSettings) -> None:
    """lora.layers must name blocks the model has (PEFT's own error blames target_modules)."""
    if not lora.layers:
        return
    blocks = sorted({
        int(found.group(1)) for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules
        and (found := re.search(r"\.(\d+)\.", name))
    })
    missing = sorted(set(lora.layers) - set(blocks))
    if missing:
        have = f"blocks {blocks[0]} to {blocks[-1]}" if blocks else "no numbered blocks"
        raise ValueError(
            f"lora.layers names blocks {missing}, which {type(base).__name__} does not have: its "
            f"{list(lora.target_modules)} layers sit in {have}"
        )


def _set_dropout(base: torch.nn.Module, rate: float) -> None:
    """Every dropout of the model at `rate`: its nn.Dropout modules (BERT, ViT and GPT-2 read their
    attention dropout from these too) and the float `attention_dropout` of Llama-style attention."""
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = rate


@torch.no_grad()
def _zero_output_layer(base: torch.nn.Module, head_modules: tuple[str, ...]) -> None:
    """Zero the head's output layer (its last Linear): the logits start at 0, the gradient at the head.

    With a zero head every example's first gradient reaches the head only,
    where DP-SGD's clipped signal is largest; LoRA starts to move once the head has.
    """
    linear = [
        m for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and any(part in head_modules for part in name.split("."))
    ]
    if not linear:
        raise ValueError(f"lora.head_init='zero': lora.head_modules {list(head_modules)} hold no Linear layer to zero")
    linear[-1].weight.zero_()
    if linear[-1].bias is not None:
        linear[-1].bias.zero_()
