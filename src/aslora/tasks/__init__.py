"""Tasks: data loading, model and head, loss and metric, one file per family."""

from __future__ import annotations

from aslora.config import ExperimentConfig
from aslora.tasks.common import DataNotFoundError
from aslora.tasks.glue import GlueTask
from aslora.tasks.synthetic import SyntheticTask

Task = GlueTask | SyntheticTask


def load_task(config: ExperimentConfig) -> Task:
    """The task named by `config.data.task`, its data loaded."""
    if config.data.task == "synthetic":
        return SyntheticTask.load(config)
    return GlueTask.load(config)


__all__ = ["DataNotFoundError", "GlueTask", "SyntheticTask", "Task", "load_task"]
