"""Tasks: data loading, model and head, loss and metric, one file per family."""

from __future__ import annotations

from aslora.config import ExperimentConfig
from aslora.tasks.common import DataNotFoundError, Task
from aslora.tasks.glue import GLUE, GlueTask
from aslora.tasks.synthetic import SyntheticTask


def load_task(config: ExperimentConfig) -> Task:
    """The task named by `config.data.task`, its data loaded."""
    name = config.data.task
    if name == "synthetic":
        return SyntheticTask.load(config)
    if name in GLUE:
        return GlueTask.load(config)
    raise ValueError(f"data.task={name!r} has no loader yet")


__all__ = ["DataNotFoundError", "GlueTask", "SyntheticTask", "Task", "load_task"]
