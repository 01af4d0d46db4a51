"""What a benchmark row needs from its run, checked once for every script that records rows."""

from __future__ import annotations

from typing import Any

from aslora.config import ExperimentConfig


def require_sound(summary: dict[str, Any], config: ExperimentConfig) -> None:
    """Refuse to record a run whose server rejected client updates without a simulated fault.

    The server logs a rejected update and goes on (a federation must survive a bad client); a
    benchmark must not, or a run whose clients all raised would stand in a table at its start's
    accuracy.
    """
    fed = config.federation
    rejected = summary["rejected_updates"]
    if rejected and fed.dropout == 0 and fed.stragglers == 0:
        raise SystemExit(
            f"{config.name} ({config.method}, seed {config.seed}): the server rejected {rejected} client updates "
            "(the log names each and why); no row is recorded: fix the cause and run again"
        )
