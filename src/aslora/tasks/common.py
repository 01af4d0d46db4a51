"""What every task shares: where local data lives, and the error when it is not there."""

from __future__ import annotations

import os
from pathlib import Path

from aslora.config import ExperimentConfig


class DataNotFoundError(FileNotFoundError):
    """The data set is neither in the local data folder nor reachable on the hub."""


def data_root(config: ExperimentConfig) -> Path | None:
    """The local data folder: data.dir, else $ASLORA_DATA_DIR, else none (use the hub)."""
    root = config.data.dir or os.environ.get("ASLORA_DATA_DIR") or None
    return Path(root) if root else None
