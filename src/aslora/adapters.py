"""The LoRA view of a PEFT model: adapted layers, their A/B factors, the head.

Methods and clients never reach into model internals; they read and write
factors here, by layer name, as plain tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

FACTORS = ("A", "B")
Factors = dict[str, dict[str, torch.Tensor]]  # layer -> {"A": r x k, "B": d x r}
Mask = Mapping[str, Iterable[str]]  # layer -> the factors it trains
_PEFT_PREFIX = "base_model.model."


class LoraView:
    """Named access to the LoRA factors and trainable head of one PEFT model."""

    def __init__(self, model: PeftModel, adapter: str = "default") -> None:
        self.model = model
        self.adapter = adapter
        self._layers: dict[str, LoraLayer] = {
            name.removeprefix(_PEFT_PREFIX): module
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A
        }
        if not self._layers:
            raise ValueError("the model has no LoRA layers; check lora.target_modules")
        self._w0: dict[str, torch.Tensor] = {}  # pristine frozen weights, kept once a residual is set
        self._head = {
            name.removeprefix(_PEFT_PREFIX): p
            for name, p in model.named_parameters()
            if f"modules_to_save.{adapter}." in name
        }

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    def scaling(self, layer: str) -> float:
        """s = alpha / r of the layer: dW = s B A."""
        return float(self._layers[layer].scaling[self.adapter])

    def parameter(self, layer: str, factor: str) -> torch.nn.Parameter:
        module = self._layers[layer]
        if factor == "A":
            return module.lora_A[self.adapter].weight
        if factor == "B":
            return module.lora_B[self.adapter].weight
        raise KeyError(f"unknown LoRA factor {factor!r}; expected one of {FACTORS}")

    def base_weight(self, layer: str) -> torch.Tensor:
        """A copy of the frozen pretrained weight W0 of the layer (d x k)."""
        if layer in self._w0:
            return self._w0[layer].clone()
        return self._layers[layer].get_base_layer().weight.detach().clone()

    @torch.no_grad()
    def set_residual(self, residual: Mapping[str, torch.Tensor]) -> None:
        """Frozen weights W0 + residual per layer (W0 where none is given).

        For methods that fold exact updates into the frozen weights (FedEx-LoRA,
        FLoRA). A no-op for the others, which never set one.
        """
        if not residual and not self._w0:
            return
        for layer, module in self._layers.items():
            weight = module.get_base_layer().weight
            original = self._w0.setdefault(layer, weight.detach().clone())
            delta = residual.get(layer)
            weight.copy_(original if delta is None else original + delta.to(weight.dtype))

    def get_factors(self) -> Factors:
        """Detached copies of every factor."""
        return {
            layer: {f: self.parameter(layer, f).detach().clone() for f in FACTORS}
            for layer in self._layers
        }

    @torch.no_grad()
    def set_factors(self, values: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Overwrite the given factors (any subset of layers and factors)."""
        for layer, factors in values.items():
            for factor, tensor in factors.items():
                param = self.parameter(layer, factor)
                param.copy_(tensor.to(dtype=param.dtype, device=param.device))

    @property
    def head(self) -> dict[str, torch.nn.Parameter]:
        """The fully trained head parameters (PEFT's modules_to_save copy)."""
        return dict(self._head)

    def get_head(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self._head.items()}

    @torch.no_grad()
    def set_head(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in values.items():
            self._head[name].copy_(tensor.to(self._head[name].dtype))

    def set_trainable(self, mask: Mask, train_head: bool) -> list[torch.nn.Parameter]:
        """Freeze everything, then unfreeze the masked factors (and the head).

        Returns the trainable parameters in a fixed order. Call it only while no
        Opacus hooks are attached: changing requires_grad under attached hooks
        breaks per-sample clipping.
        """
        for p in self.model.parameters():
            p.requires_grad_(False)
        trainable = []
        for layer in self._layers:
            for factor in FACTORS:
                if factor in set(mask.get(layer, ())):
                    param = self.parameter(layer, factor)
                    param.requires_grad_(True)
                    trainable.append(param)
        if train_head:
            for p in self._head.values():
                p.requires_grad_(True)
                trainable.append(p)
        return trainable

    def export(self, directory: str | Path) -> Path:
        """Save the adapter (and head) in PEFT format for PeftModel.from_pretrained."""
        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        return directory
