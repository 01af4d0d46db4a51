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


def test_hessian_vector_products_through_bert_match_finite_differences(tiny_config) -> None:  # type: ignore[no-untyped-def]
    """Double backward through the real MiniLM (attention on the math kernel) gives H v, checked
    against central differences of the gradient along v; B != 0 so that A's curvature is not zero."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from aslora.experiment import prepare
    from aslora.sharpness import hessian_vector_product

    setup = prepare(tiny_config)
    view, task = setup.view, setup.task
    batch = task.encode(setup.shards[0].select(range(8))).tensors
    layer = view.layers[0]
    params = [view.parameter(layer, "A"), view.parameter(layer, "B")]
    for p in view.model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        params[1].normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    for p in params:
        p.requires_grad_(True)
    view.model.eval()
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for p in params]

    def loss() -> torch.Tensor:
        return task.loss(view.model, batch)

    with sdpa_kernel(SDPBackend.MATH):
        exact = hessian_vector_product(loss, params)(direction)

    def gradient_at(step: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p.add_(step * v)
        grads = torch.autograd.grad(loss(), params)
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p.sub_(step * v)
        return list(grads)

    eps = 1e-2
    plus, minus = gradient_at(eps), gradient_at(-eps)
    estimate = torch.cat([((g1 - g0) / (2 * eps)).flatten() for g1, g0 in zip(plus, minus, strict=True)])
    computed = torch.cat([h.flatten() for h in exact])
    assert computed.norm() > 0
    assert (computed - estimate).norm() < 0.05 * computed.norm()
