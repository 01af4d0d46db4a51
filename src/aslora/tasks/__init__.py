"""Tasks: data loading, model and head, loss and metric, one file per family."""

from __future__ import annotations

from aslora.config import ExperimentConfig
from aslora.tasks.common import DataNotFoundError, Task
from aslora.tasks.generation import GenerationTask
from aslora.tasks.glue import GLUE, GlueTask
from aslora.tasks.squad import SquadTask
from aslora.tasks.synthetic import SyntheticTask
from aslora.tasks.vision import VISION_TASKS, VisionTask


def load_task(config: ExperimentConfig) -> Task:
    """The task named by `config.data.task`, its data loaded."""
    name = config.data.task
    if name == "synthetic":
        return SyntheticTask.load(config)
    if name in GLUE:
        return GlueTask.load(config)
    if name in ("squad", "squad_v2"):
        return SquadTask.load(config)
    if name in VISION_TASKS:
        return VisionTask.load(config)
    if name == "sst2_generation":
        return GenerationTask.load(config)
    raise ValueError(f"unknown data.task={name!r}")


__all__ = ["DataNotFoundError", "GlueTask", "SyntheticTask", "Task", "load_task"]
