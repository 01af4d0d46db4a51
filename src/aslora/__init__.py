"""AS-LoRA: differentially private federated LoRA with adaptive factor selection."""

__version__ = "0.1.0"
