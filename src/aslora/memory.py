"""Will one micro-batch fit? An upper estimate of a text encoder's backward-pass memory, checked
before any training so that a batch too large fails with the size that fits, not an OOM kill."""

from __future__ import annotations

import psutil
from transformers import PretrainedConfig

from aslora.config import ConfigError


def micro_batch_bytes(model: PretrainedConfig, examples: int, length: int, dtype_bytes: int) -> int:
    """What the backward pass of `examples` sequences of `length` tokens keeps, at most.

    Per layer and token: about ten hidden-size vectors (attention inputs and
    outputs, layer norms, residuals, the LoRA inputs Opacus records), two of the
    feed-forward width, and two rows of attention scores. Measured against
    benchmarks/batch_memory.py (MiniLM, float32: 1.3 GiB above the loaded model
    for 128 sentences of up to about 60 tokens; this gives 1.4 GiB).
    """
    per_token = model.num_hidden_layers * (
        10 * model.hidden_size + 2 * model.intermediate_size + 2 * model.num_attention_heads * length
    )
    return examples * length * per_token * dtype_bytes


def check_micro_batch(model: PretrainedConfig, micro_batch: int, length: int, dtype_bytes: int) -> None:
    """Refuse a physical batch whose backward pass would not fit in the memory available now.

    Without micro-batches the physical batch is the whole Poisson batch: pass an
    upper bound of it (its mean plus a few standard deviations).
    """
    available = psutil.virtual_memory().available
    needed = micro_batch_bytes(model, micro_batch, length, dtype_bytes)
    if needed <= available:
        return
    fits = max(0, available // max(1, micro_batch_bytes(model, 1, length, dtype_bytes)))
    raise ConfigError(
        f"optim.micro_batch_size: a physical batch of {micro_batch} sequences of model.max_length={length} "
        f"tokens needs about {needed / 2**30:.1f} GiB for its backward pass, more than the "
        f"{available / 2**30:.1f} GiB available: set optim.micro_batch_size to {fits} or less"
    )
