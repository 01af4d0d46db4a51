"""The server's optimiser (federation.server_optimizer): the round's aggregate, read as a
pseudo-gradient (the start minus the clients' mean), steps the global tensors through torch.optim
(Reddi et al. 2021, "Adaptive Federated Optimization": FedAvgM with SGD and momentum, FedAdam with
Adam). With 'none' the aggregate is the next global state, as in FedAvg.

Why: on SST-2 the private runs are under-trained, not noise-bound (benchmarks/RESULTS.md: the
carved validation accuracy still rises at round 120, and sigma 0 ends where epsilon 3 does), and
one clipped, joint DP-SGD step gives the head far larger moves than the adapters. Adam scales each
coordinate by its own running size, momentum carries the direction across rounds. Both act only
on what the server released anyway: post-processing, no privacy cost.

Only the tensors the round changed step (the rest get no gradient, which torch.optim skips, state
and all): a factor a method froze this round stays frozen, so AS-LoRA's aggregation stays exact,
the server step being a function of the exact mean. Only methods whose server rule is a weighted
mean of the uploads (Method.linear_server) take one: for a rule that refactorises or folds
(FedSVD, FLoRA, FedEx-LoRA), start minus result is not a gradient of anything.
"""

from __future__ import annotations

from typing import Any

import torch

from aslora.protocol import GlobalState


class ServerOptimizer:
    """torch.optim over the global tensors, stepped once per round by the aggregate's pseudo-gradient."""

    def __init__(self, kind: str, initial: GlobalState, lr: float, momentum: float, beta2: float, eps: float) -> None:
        # Sorted names: the optimiser's state_dict numbers parameters in this order, so a resumed
        # run maps its saved moments back onto the same tensors.
        self.params = {n: torch.nn.Parameter(t.detach().clone()) for n, t in sorted(initial.tensors().items())}
        ordered = list(self.params.values())
        if kind == "momentum":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(ordered, lr=lr, momentum=momentum)
        elif kind == "adam":
            self.optimizer = torch.optim.Adam(ordered, lr=lr, betas=(momentum, beta2), eps=eps)
        else:
            raise ValueError(f"server optimizer {kind!r} is unknown; choose 'momentum' or 'adam'")

    def step(self, start: GlobalState, aggregate: GlobalState) -> GlobalState:
        """The next global state: `start` moved by one optimiser step along start - aggregate."""
        before, after = start.tensors(), aggregate.tensors()
        if set(after) != set(self.params):
            raise RuntimeError(
                f"the server optimiser holds {len(self.params)} tensors, the aggregate has {len(after)}: "
                "a method whose state changes shape cannot take a server optimiser"
            )
        moved = set()
        for name, param in self.params.items():
            with torch.no_grad():
                param.copy_(before[name])
            param.grad = None
            if not torch.equal(before[name], after[name]):
                param.grad = (before[name] - after[name]).to(param.dtype)
                moved.add(name)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stepped = {n: (p.detach().clone().to(after[n].dtype) if n in moved else after[n]) for n, p in self.params.items()}
        flat = GlobalState.from_tensors(stepped)
        return aggregate.evolve(factors=flat.factors, head=flat.head)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved)
