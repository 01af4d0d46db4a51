"""Synthetic low-rank recovery: L independent linear layers, each with its own rank-r target.

Each layer l maps its own input slice x_l (k dims) to y_l = (W0_l + dW*_l) x_l.
The model is W0_l plus a LoRA adapter s B_l A_l, trained with squared loss.
Targets are drawn so that some layers' dW* lie inside the row space of the
initial A_l (reachable by training B alone, as FFA-LoRA does) and the others
lie outside it (A must move). Inputs come from a few covariance types, one
per group of input directions; the Dirichlet partition over the type gives
clients non-IID input covariances. The metric is the relative error
||s B A - dW*||_F / ||dW*||_F per layer, which needs no evaluation data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import datasets
import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import TensorDataset

from aslora.adapters import LoraView
from aslora.config import ExperimentConfig


class IndependentLinears(torch.nn.Module):
    """L bias-free linear layers; layer l reads input slice l only."""

    def __init__(self, layers: int, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim_in, dim_out, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, L, k) -> (batch, L, d)
        return torch.stack([layer(x[:, i]) for i, layer in enumerate(self.layers)], dim=1)


@dataclass
class SyntheticTask:
    names: ClassVar[tuple[str, ...]] = ("synthetic",)  # low-rank recovery
    sentence_classifier: ClassVar[bool] = False
    """Data, model and metric of the low-rank recovery problem."""

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset
    targets: dict[str, torch.Tensor]  # layer name -> dW*
    base: dict[str, torch.Tensor]  # layer name -> the frozen W0 (seeded, as in build_model)
    inside: dict[str, bool]  # whether dW* lies in the row space of the initial A
    shape: tuple[int, int, int]  # (L, k, d)
    metric: str = "rel_error"
    extra_evals: dict[str, datasets.Dataset] = field(default_factory=dict)

    @classmethod
    def load(cls, config: ExperimentConfig) -> SyntheticTask:
        s = config.synthetic
        rng = np.random.default_rng(config.seed)
        view = LoraView(cls._build(config, s.layers, s.dim_in, s.dim_out))
        targets, inside = {}, {}
        base = {layer: view.base_weight(layer) for layer in view.layers}
        for i, layer in enumerate(view.layers):
            a0 = view.parameter(layer, "A").detach().double().numpy()  # r x k, the seeded init
            basis = np.linalg.qr(a0.T)[0]  # k x r, orthonormal row space of A0
            v = rng.normal(size=(s.dim_in, s.target_rank))
            if i < s.layers - s.outside_layers:
                v = basis @ (basis.T @ v)  # inside the row space: B alone can reach it
            else:
                v = v - basis @ (basis.T @ v)  # orthogonal to it: A must move
            u = rng.normal(size=(s.dim_out, s.target_rank))
            target = u @ np.linalg.qr(v)[0].T
            targets[layer] = torch.tensor(target / np.linalg.norm(target), dtype=torch.float32)
            inside[layer] = i < s.layers - s.outside_layers
        train = cls._inputs(rng, config, s.train_examples)
        evaluation = cls._inputs(rng, config, 64)  # unused by the metric; keeps the task interface
        return cls("synthetic", train, evaluation, targets, base, inside, (s.layers, s.dim_in, s.dim_out))

    @staticmethod
    def _inputs(rng: np.random.Generator, config: ExperimentConfig, n: int) -> datasets.Dataset:
        """Inputs x (L x k) of `input_types` covariance types, each stretching its own directions."""
        s = config.synthetic
        types = rng.integers(0, s.input_types, size=n)
        scales = np.ones((s.input_types, s.dim_in))
        for t, directions in enumerate(np.array_split(np.arange(s.dim_in), s.input_types)):
            scales[t, directions] = s.input_anisotropy
        x = rng.normal(size=(n, s.layers, s.dim_in)) * scales[types][:, None, :]
        return datasets.Dataset.from_dict({"x": x.astype(np.float32).tolist(), "label": types.tolist()})

    @staticmethod
    def _build(config: ExperimentConfig, layers: int, dim_in: int, dim_out: int) -> PeftModel:
        torch.manual_seed(config.seed)
        base = IndependentLinears(layers, dim_in, dim_out)
        for p in base.parameters():
            p.requires_grad_(False)
        lora = config.lora
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=[f"layers.{i}" for i in range(layers)]
        )
        return get_peft_model(base, peft_config)

    def build_model(self, config: ExperimentConfig) -> PeftModel:
        """The frozen W0 layers with seeded LoRA adapters (the same A0 the targets were drawn against)."""
        return self._build(config, *self.shape)

    def encode(self, split: datasets.Dataset) -> TensorDataset:
        """Inputs x and their targets y_l = (W0_l + dW*_l) x_l."""
        x = torch.tensor(np.asarray(split["x"], dtype=np.float32))
        y = torch.stack([x[:, i] @ (self.base[layer] + t).T for i, (layer, t) in enumerate(self.targets.items())], dim=1)
        return TensorDataset(x, y)

    encode_train = encode  # one row per example already

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean over the batch of the squared error summed over layers and outputs."""
        x, y = batch
        return ((module(x) - y) ** 2).sum(dim=(1, 2)).mean()

    def evaluate(self, model: torch.nn.Module, data: TensorDataset, batch_size: int) -> dict[str, float]:
        """Relative error of the learned update per layer, and its mean."""
        view = LoraView(_peft(model))
        errors = {}
        with torch.no_grad():
            for layer, target in self.targets.items():
                update = view.scaling(layer) * view.parameter(layer, "B") @ view.parameter(layer, "A")
                errors[layer] = float(torch.linalg.matrix_norm(update - target) / torch.linalg.matrix_norm(target))
        metrics = {"rel_error": float(np.mean(list(errors.values())))}
        metrics.update({f"rel_error/{_short(layer)}": e for layer, e in errors.items()})
        return metrics


def _peft(module: torch.nn.Module) -> PeftModel:
    """The PeftModel under Opacus's wrapper, if any."""
    return module._module if hasattr(module, "_module") else module


def _short(layer: str) -> str:
    return "layer" + layer.rsplit(".", 1)[-1]
