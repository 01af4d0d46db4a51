"""Tasks: data loading, model and head, loss and metric, one file per family."""

from __future__ import annotations

from aslora.config import ExperimentConfig
from aslora.tasks.common import DataNotFoundError
from aslora.tasks.glue import GlueTask


def load_task(config: ExperimentConfig) -> GlueTask:
    """The task named by `config.data.task`, its data loaded."""
    return GlueTask.load(config)


__all__ = ["DataNotFoundError", "GlueTask", "load_task"]
