"""How sharp the loss is around the trained adapter: the Hessian's largest eigenvalue and its trace.

Both come from Hessian-vector products (double backward), so the Hessian of
the LoRA factors is never formed: the eigenvalue by power iteration, the
trace by Hutchinson's estimator with Rademacher probes. The paper claims
AS-LoRA reaches flatter minima; these are the two standard measures of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

Vectors = list[torch.Tensor]


@dataclass(frozen=True)
class Sharpness:
    top_eigenvalue: float
    trace: float
    trace_std_error: float  # of the Hutchinson mean over probes


def _dot(a: Vectors, b: Vectors) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def hessian_vector_product(loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> Callable[[Vectors], Vectors]:
    """v -> H v at the current parameters, H the Hessian of `loss()` in `params`."""
    grads = torch.autograd.grad(loss(), list(params), create_graph=True)

    def hvp(v: Vectors) -> Vectors:
        return [h.detach() for h in torch.autograd.grad(grads, list(params), grad_outputs=v, retain_graph=True)]

    return hvp


def measure(
    loss: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    iterations: int = 20,
    probes: int = 20,
    seed: int = 0,
) -> Sharpness:
    """Largest eigenvalue (power iteration) and trace (Hutchinson) of the Hessian of `loss()` in `params`.

    Power iteration finds the eigenvalue of largest magnitude: at a minimum,
    where the Hessian is nearly positive semi-definite, that is the top one.
    Attention runs on the math SDPA kernel, the one with a double backward.
    """
    with sdpa_kernel(SDPBackend.MATH):
        return _measure(loss, params, iterations, probes, seed)


def _measure(
    loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], iterations: int, probes: int, seed: int
) -> Sharpness:
    hvp = hessian_vector_product(loss, params)
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    eigenvalue = torch.zeros(())
    for _ in range(iterations):
        norm = torch.sqrt(_dot(v, v))
        v = [x / norm for x in v]
        hv = hvp(v)
        eigenvalue = _dot(v, hv)
        v = hv
    samples = []
    for _ in range(probes):
        z = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
        samples.append(float(_dot(z, hvp(z))))
    values = torch.tensor(samples, dtype=torch.float64)
    error = float(values.std() / len(samples) ** 0.5) if len(samples) > 1 else float("nan")
    return Sharpness(float(eigenvalue), float(values.mean()), error)
