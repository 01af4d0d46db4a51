"""Memory of DP-SGD on a client: will one micro-batch fit (an upper estimate of a text encoder's
backward pass, checked before training, so that a batch too large fails with the size that fits,
not an OOM kill), and freed activations returned to the system so that memory stays flat."""

from __future__ import annotations

import ctypes
import functools

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


@functools.cache
def return_freed_tensors_to_the_system() -> bool:
    """Serve every allocation over 128 KiB from its own mmap, so that a freed tensor goes back to the OS.

    glibc raises its mmap threshold each time a large block is freed, after which
    the activations of micro-batches of varying length come from the heap and
    fragment it: measured (benchmarks/batch_memory.py) on DP-SGD with MiniLM, the
    resident memory grew from 2.0 to 3.2 GiB over 6 client rounds, and stays at
    0.9 GiB with the threshold fixed. Python has no binding for mallopt, hence
    ctypes; elsewhere than glibc this does nothing. Returns whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))
