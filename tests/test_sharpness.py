"""The sharpness measures against a Hessian known in closed form."""

from __future__ import annotations

import torch

from aslora.sharpness import measure


def test_top_eigenvalue_and_trace_of_a_known_quadratic() -> None:
    """loss = x'Hx / 2 with x split over two tensors as an adapter is."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    spectrum = torch.linspace(0.1, 5.0, 12, dtype=torch.float64)
    hessian = q @ torch.diag(spectrum) @ q.T
    a = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        x = torch.cat([a.reshape(-1), b])
        return 0.5 * x @ hessian @ x

    result = measure(loss, [a, b], iterations=200, probes=400, seed=1)
    assert abs(result.top_eigenvalue - 5.0) < 1e-3
    assert abs(result.trace - float(spectrum.sum())) < 4 * result.trace_std_error
    assert result.trace_std_error < 0.05 * float(spectrum.sum())
